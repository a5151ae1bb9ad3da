# Everyday commands. `make help` lists them.
.DEFAULT_GOAL := help
VENV := .venv/bin

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

setup: ## install packages, kernel headers and the venv (root)
	scripts/setup.sh --test

run: ## the main job: sensor streaming live events to stdout (root)
	scripts/run.sh

test: ## the whole test suite, lint first (root)
	scripts/test.sh

lint: ## ruff and mypy
	$(VENV)/ruff check .
	$(VENV)/ruff format --check .
	$(VENV)/mypy sensor backplane

fmt: ## format the code
	$(VENV)/ruff format .
	$(VENV)/ruff check --fix .

bench: ## the benchmarks (root, takes minutes)
	$(VENV)/python bench/exec_storm.py

# tcg: Debian's kernels hang at boot under this host's nested KVM; VM_ACCEL=kvm where it works
VM_ACCEL ?= tcg
vm-test: ## kprobe and tracepoint tiers in QEMU on Debian 6.1 and 6.12 kernels (root)
	dpkg-query -W debootstrap qemu-system-x86 qemu-utils >/dev/null 2>&1 || \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap qemu-system-x86 qemu-utils
	$(VENV)/python tests/vm/harness.py --accel $(VM_ACCEL)

install: ## install sensor and controller as systemd services under /opt/edr (root)
	scripts/install.sh $(INSTALL_ARGS)

uninstall: ## remove the services, /opt/edr and the nftables table; PURGE=1 also config and state
	scripts/uninstall.sh $(if $(PURGE),--purge)

probe: ## which capture tiers work on this machine
	$(VENV)/edr-sensor probe

.PHONY: help setup run test lint fmt bench install uninstall probe vm-test
