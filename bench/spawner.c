/*
 * spawner: the exec-storm workload. N workers each run "<program> <marker>" in a tight
 * fork + execve + waitpid loop for a fixed time, then report how many they completed.
 *
 *   spawner <workers> <duration_ms> <program> <marker>
 *
 * Prints one JSON line on stdout:
 *   {"workers":N,"spawned":total,"failed":n,"elapsed":s,"cpu":s}
 * "spawned" counts children that exec'd and exited 0; a failed exec (the child exits 127)
 * counts under "failed", so a wrong program path cannot pass as a fast run. "cpu" is the user
 * + system time of all workers and their children (RUSAGE_CHILDREN once all are reaped):
 * the work the storm cost, which neighbours on the machine disturb far less than the rate.
 *
 * Why C: a Python loop adds its own interpreter cost to every spawn and forks a large
 * address space; this keeps the workload the kernel's fork/exec/exit paths, which is
 * what a tracer slows down. Workers start together on a pipe so their windows overlap.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAX_WORKERS 64

extern char **environ;

struct result {
	long spawned;
	long failed;
};

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static int parse_long(const char *s, long lo, long hi, long *out)
{
	char *end;
	long v;

	errno = 0;
	v = strtol(s, &end, 10);
	if (errno || end == s || *end != '\0' || v < lo || v > hi)
		return -1;
	*out = v;
	return 0;
}

static void worker(pid_t parent, int go_fd, int out_fd, double duration, char *program,
		   char *marker)
{
	char *argv[] = { program, marker, NULL };
	struct result r = { 0, 0 };
	char byte;
	double deadline;

	/* If the spawner is killed (the benchmark interrupted), its workers go with it. */
	if (prctl(PR_SET_PDEATHSIG, SIGKILL) || getppid() != parent)
		_exit(1);
	/* Block until the parent releases every worker at once (EOF on the pipe). */
	while (read(go_fd, &byte, 1) < 0 && errno == EINTR)
		;
	deadline = now() + duration;
	while (now() < deadline) {
		int status;
		pid_t pid = fork();

		if (pid < 0) {
			if (errno == EAGAIN || errno == ENOMEM) {
				r.failed++;
				continue;
			}
			perror("spawner: fork");
			_exit(1);
		}
		if (pid == 0) {
			execve(program, argv, environ);
			_exit(127);
		}
		while (waitpid(pid, &status, 0) < 0) {
			if (errno != EINTR) {
				perror("spawner: waitpid");
				_exit(1);
			}
		}
		if (WIFEXITED(status) && WEXITSTATUS(status) == 0)
			r.spawned++;
		else
			r.failed++;
	}
	if (write(out_fd, &r, sizeof(r)) != (ssize_t)sizeof(r))
		_exit(1);
	_exit(0);
}

int main(int argc, char **argv)
{
	long workers, duration_ms, total = 0, failed = 0;
	pid_t pids[MAX_WORKERS], self = getpid();
	int go[2], out[2];
	double start, elapsed, cpu;
	struct rusage ru;
	int bad = 0;

	if (argc != 5 || parse_long(argv[1], 1, MAX_WORKERS, &workers) ||
	    parse_long(argv[2], 1, 3600L * 1000, &duration_ms) || argv[3][0] != '/' ||
	    argv[4][0] == '\0') {
		fprintf(stderr,
			"usage: spawner <workers 1-%d> <duration_ms 1-3600000> "
			"</absolute/program> <marker>\n", MAX_WORKERS);
		return 2;
	}
	if (access(argv[3], X_OK) != 0) {
		fprintf(stderr, "spawner: %s is not executable: %s\n", argv[3], strerror(errno));
		return 2;
	}
	if (pipe(go) || pipe(out)) {
		perror("spawner: pipe");
		return 1;
	}
	for (long i = 0; i < workers; i++) {
		pids[i] = fork();
		if (pids[i] < 0) {
			perror("spawner: fork worker");
			return 1;
		}
		if (pids[i] == 0) {
			close(go[1]);
			close(out[0]);
			worker(self, go[0], out[1], (double)duration_ms / 1000.0, argv[3], argv[4]);
		}
	}
	close(go[0]);
	close(out[1]);
	start = now();
	close(go[1]); /* releases all workers */
	for (long i = 0; i < workers; i++) {
		struct result r;
		ssize_t n = read(out[0], &r, sizeof(r));

		if (n != (ssize_t)sizeof(r)) {
			bad = 1;
			break;
		}
		total += r.spawned;
		failed += r.failed;
	}
	elapsed = now() - start;
	for (long i = 0; i < workers; i++) {
		int status;

		if (waitpid(pids[i], &status, 0) < 0 || !WIFEXITED(status) || WEXITSTATUS(status))
			bad = 1;
	}
	if (bad) {
		fprintf(stderr, "spawner: a worker failed\n");
		return 1;
	}
	if (getrusage(RUSAGE_CHILDREN, &ru)) {
		perror("spawner: getrusage");
		return 1;
	}
	cpu = (double)(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) +
	      (double)(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
	printf("{\"workers\":%ld,\"spawned\":%ld,\"failed\":%ld,\"elapsed\":%.6f,\"cpu\":%.6f}\n",
	       workers, total, failed, elapsed, cpu);
	return 0;
}
