// Response actions: say exactly what will happen, ask, queue the command, follow its state.
import { api } from "./api.js";
import { badge, clear, confirmAction, h, showError, toast } from "./ui.js";

const FINAL = new Set(["succeeded", "failed", "expired"]);

/** What ``action`` with ``args`` will do on ``hostLabel``, in one sentence. */
export function describe(action, args, hostLabel) {
  const proc = args.label ? `${args.pid} (${args.label})` : `${args.pid}`;
  const on = `on host ${hostLabel}`;
  switch (action) {
    case "kill": return `Kill process ${proc} ${on} with SIGKILL. It cannot clean up or be resumed.`;
    case "kill-tree": return `Kill process ${proc} and every descendant of it ${on} with SIGKILL.`;
    case "suspend": return `Suspend (SIGSTOP) process ${proc} ${on}; it stays held until resumed.`;
    case "resume": return `Resume (SIGCONT) the held process ${proc} ${on}; it runs on from where it stopped.`;
    case "quarantine": return `Move ${args.path} ${on} into the root-only quarantine, keeping its hash and metadata; it can be restored later.`;
    case "block-ip": return `Block all traffic to and from ${args.address} ${on} in the sensor's nftables table.`;
    case "isolate": return `Isolate host ${hostLabel}: drop all network traffic except to and from this controller until isolation is lifted.`;
    case "unisolate": return `Lift the network isolation of host ${hostLabel}; its traffic flows normally again.`;
    default: return `Send “${action}” ${on} with ${JSON.stringify(args)}.`;
  }
}

/**
 * Confirm, then queue ``action`` on ``hostId`` and show its progress in ``statusEl`` until it
 * finishes (polling the command, since the sensor answers asynchronously).
 */
export async function respond(hostId, hostLabel, action, args, statusEl) {
  const { label, ...wire } = args;
  const ok = await confirmAction(`Confirm: ${action}`, describe(action, args, hostLabel),
    action.replace("-", " "));
  if (!ok) return null;
  let cmd;
  try {
    cmd = await api("POST", `/hosts/${encodeURIComponent(hostId)}/commands`,
      { action, args: wire }, { headers: { "Idempotency-Key": crypto.randomUUID() } });
  } catch (e) { showError(e, statusEl); return null; }
  toast(`${action} queued as command ${cmd.id}`);
  return follow(cmd, statusEl);
}

/** Poll a command until it is final, drawing its state; resolves to the last record. */
export async function follow(cmd, statusEl) {
  const draw = (c) => statusEl && clear(statusEl, h("span", { class: "cmd-status",
    dataset: { status: c.status } }, `command ${c.id} (${c.action}): `, badge(c.status),
  FINAL.has(c.status) ? null : [" ", h("span", { class: "progress", "aria-label": "in progress" })],
  c.output ? [" ", h("code", {}, JSON.stringify(c.output))] : null));
  draw(cmd);
  for (let i = 0; i < 600 && !FINAL.has(cmd.status); i++) {
    await new Promise((r) => setTimeout(r, 1000));
    if (statusEl && !statusEl.isConnected) return cmd; // the page was left
    try { cmd = await api("GET", `/commands/${cmd.id}`); } catch (e) { showError(e); return cmd; }
    draw(cmd);
  }
  if (cmd.status === "failed") toast(`command ${cmd.id} failed`, "error");
  return cmd;
}
