/* The floor of a raw SYN sweep (benchmarks/run.py, issue 16): one raw socket, one SYN per
 * port, every answer counted. No retries, no adaptive timeouts, no output format beyond one
 * line per port: what the kernel costs, against which portmesh is measured as a ratio.
 *
 *   floor_syn [-w WAIT_MS] [-m BATCH] [-t] [-S START] -p LO-HI ADDR...    (IPv4 only, CAP_NET_RAW)
 *
 * Prints "ADDR PORT open|closed|filtered" per port (the benchmark checks it against the lab's
 * truth like every other tool) and ends when every port answered or WAIT_MS (default 100: two
 * attempts at portmesh's 50 ms minimum timeout) passed since the last packet sent or received.
 * The sequence number is a hash of (address, port) checked in the answer's acknowledgement.
 *
 * For the mesh's figure (benchmarks/mesh.py --floor: one lab host sweeping its peer's NodePort
 * range): -t prints one more line, on stderr, with the spans of the sweep (first send to last
 * answer, and first answer to last answer as the mesh's results span), -S waits until START
 * (CLOCK_REALTIME seconds) before the first send so that two sweeps can start together, and
 * -m sends BATCH SYNs per system call (sendmmsg) instead of one sendto each.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define SPORT 61000

static uint32_t seq_of(uint32_t addr, uint16_t port) {
	uint32_t h = addr * 2654435761u ^ (uint32_t)port * 40503u ^ 0x5bd1e995u;
	h ^= h >> 15;
	h *= 2246822519u;
	return h ^ (h >> 13);
}

static uint16_t csum(const uint16_t *p, int n, uint32_t s) {
	for (; n > 1; n -= 2) s += *p++;
	while (s >> 16) s = (s & 0xffff) + (s >> 16);
	return (uint16_t)~s;
}

static double now_ms(void) {
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static int naddr, lo, hi;
static uint32_t addrs[256];
static unsigned char *state; /* 0 silent, 1 open, 2 closed */
static long answered, total;
static double first_ans, last_ans;

static void drain(int s) {
	unsigned char buf[128];
	for (;;) {
		ssize_t n = recv(s, buf, sizeof buf, MSG_DONTWAIT);
		if (n < 0) return;
		if (n < 40) continue;
		int ihl = (buf[0] & 15) * 4;
		if (n < ihl + 14) continue;
		uint32_t src;
		uint16_t sport, dport;
		uint32_t ack;
		memcpy(&src, buf + 12, 4);
		memcpy(&sport, buf + ihl, 2);
		memcpy(&dport, buf + ihl + 2, 2);
		memcpy(&ack, buf + ihl + 8, 4);
		sport = ntohs(sport);
		if (ntohs(dport) != SPORT || sport < lo || sport > hi) continue;
		int i;
		for (i = 0; i < naddr && addrs[i] != src; i++);
		if (i == naddr || ntohl(ack) != seq_of(src, sport) + 1) continue;
		unsigned char fl = buf[ihl + 13];
		long k = (long)i * (hi - lo + 1) + (sport - lo);
		if (state[k]) continue;
		state[k] = (fl & 0x04) ? 2 : ((fl & 0x12) == 0x12 ? 1 : 0);
		if (state[k]) {
			last_ans = now_ms();
			if (!answered++) first_ans = last_ans;
		}
	}
}

static uint32_t src[256];

static void build(unsigned char *pkt, int i, int p) { /* the SYN to addrs[i]:p, 24 bytes */
	uint16_t v;
	uint32_t w;
	memset(pkt, 0, 24);
	v = htons(SPORT); memcpy(pkt, &v, 2);
	v = htons(p); memcpy(pkt + 2, &v, 2);
	w = htonl(seq_of(addrs[i], p)); memcpy(pkt + 4, &w, 4);
	pkt[12] = 6 << 4; pkt[13] = 0x02;
	v = htons(64240); memcpy(pkt + 14, &v, 2);
	pkt[20] = 2; pkt[21] = 4; v = htons(1460); memcpy(pkt + 22, &v, 2);
	uint32_t ps = (src[i] & 0xffff) + (src[i] >> 16) + (addrs[i] & 0xffff) + (addrs[i] >> 16) + htons(6) + htons(24);
	v = csum((uint16_t *)pkt, 24, ps); memcpy(pkt + 16, &v, 2);
}

static int again(int s) { /* a full send queue: read answers, then try again */
	if (errno != ENOBUFS && errno != EAGAIN && errno != EINTR) { perror("floor_syn: send"); return 0; }
	drain(s);
	return 1;
}

#define MAXB 1024

int main(int argc, char **argv) {
	double wait = 100, start = 0;
	int opt, batch = 1, timing = 0;
	while ((opt = getopt(argc, argv, "w:p:m:tS:")) != -1) {
		if (opt == 'w') wait = atof(optarg);
		else if (opt == 'p' && sscanf(optarg, "%d-%d", &lo, &hi) == 2) continue;
		else if (opt == 'm' && (batch = atoi(optarg)) >= 1 && batch <= MAXB) continue;
		else if (opt == 't') timing = 1;
		else if (opt == 'S') start = atof(optarg);
		else { fprintf(stderr, "usage: floor_syn [-w MS] [-m BATCH] [-t] [-S START] -p LO-HI ADDR...\n"); return 2; }
	}
	if (!hi) hi = lo;
	for (; optind < argc && naddr < 256; optind++) {
		struct in_addr a;
		if (!inet_aton(argv[optind], &a)) { fprintf(stderr, "floor_syn: bad address %s\n", argv[optind]); return 2; }
		addrs[naddr++] = a.s_addr;
	}
	if (!naddr || lo < 1 || hi > 65535 || lo > hi) { fprintf(stderr, "floor_syn: need -p LO-HI and an address\n"); return 2; }
	int s = socket(AF_INET, SOCK_RAW, IPPROTO_TCP);
	if (s < 0) { perror("floor_syn: raw socket"); return 2; }
	int big = 32 << 20;
	if (setsockopt(s, SOL_SOCKET, SO_RCVBUFFORCE, &big, sizeof big))
		setsockopt(s, SOL_SOCKET, SO_RCVBUF, &big, sizeof big);
	total = (long)naddr * (hi - lo + 1);
	state = calloc(total, 1);
	for (int i = 0; i < naddr; i++) { /* the source address the route picks (no packet sent) */
		int u = socket(AF_INET, SOCK_DGRAM, 0);
		struct sockaddr_in d = {.sin_family = AF_INET, .sin_port = htons(9), .sin_addr.s_addr = addrs[i]};
		socklen_t l = sizeof d;
		connect(u, (struct sockaddr *)&d, sizeof d);
		getsockname(u, (struct sockaddr *)&d, &l);
		src[i] = d.sin_addr.s_addr;
		close(u);
	}
	static unsigned char pkts[MAXB][24];
	static struct sockaddr_in dst[MAXB];
	static struct iovec iov[MAXB];
	static struct mmsghdr mm[MAXB];
	for (int k = 0; k < batch; k++) {
		iov[k] = (struct iovec){.iov_base = pkts[k], .iov_len = 24};
		mm[k].msg_hdr = (struct msghdr){.msg_name = &dst[k], .msg_namelen = sizeof dst[k], .msg_iov = &iov[k], .msg_iovlen = 1};
	}
	if (start > 0) {
		struct timespec at = {.tv_sec = (time_t)start, .tv_nsec = (long)((start - (time_t)start) * 1e9)};
		while (clock_nanosleep(CLOCK_REALTIME, TIMER_ABSTIME, &at, NULL) == EINTR);
	}
	double first_send = now_ms(), last;
	int n = 0;
	for (int p = lo; p <= hi; p++) { /* port-major: each host sees one SYN at a time */
		for (int i = 0; i < naddr; i++) {
			dst[n] = (struct sockaddr_in){.sin_family = AF_INET, .sin_addr.s_addr = addrs[i]};
			build(pkts[n], i, p);
			if (++n < batch && !(p == hi && i == naddr - 1)) continue;
			if (batch == 1) {
				while (sendto(s, pkts[0], 24, 0, (struct sockaddr *)&dst[0], sizeof dst[0]) < 0)
					if (!again(s)) return 1;
			} else {
				for (int done = 0; done < n;) {
					int r = sendmmsg(s, mm + done, n - done, 0);
					if (r > 0) done += r;
					else if (!again(s)) return 1;
				}
			}
			n = 0;
		}
		if (((p - lo) & 63) == 0) drain(s);
	}
	double sent = now_ms();
	last = now_ms();
	long seen = answered;
	while (answered < total) {
		struct pollfd pf = {.fd = s, .events = POLLIN};
		double left = last + wait - now_ms();
		if (left <= 0) break;
		poll(&pf, 1, (int)left + 1);
		drain(s);
		if (answered != seen) { seen = answered; last = now_ms(); }
	}
	if (timing) {
		struct rusage ru;
		getrusage(RUSAGE_SELF, &ru);
		fprintf(stderr, "floor_syn: %ld flows, %ld answered, sending %.3f ms, first send to last answer %.3f ms, "
			"first to last answer %.3f ms, cpu user %.3f ms sys %.3f ms\n",
			total, answered, sent - first_send, answered ? last_ans - first_send : 0.0, answered ? last_ans - first_ans : 0.0,
			ru.ru_utime.tv_sec * 1e3 + ru.ru_utime.tv_usec / 1e3, ru.ru_stime.tv_sec * 1e3 + ru.ru_stime.tv_usec / 1e3);
	}
	for (long k = 0; k < total; k++) {
		struct in_addr a = {.s_addr = addrs[k / (hi - lo + 1)]};
		printf("%s %ld %s\n", inet_ntoa(a), lo + k % (hi - lo + 1), state[k] == 1 ? "open" : state[k] == 2 ? "closed" : "filtered");
	}
	return 0;
}
