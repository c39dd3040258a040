/*
 * floor_spoa.c: the cheapest correct SPOP agent we can think of, as a floor for the benchmarks.
 *
 * It answers every NOTIFY with the same ACK: set-var txn.<node-var> = the fixed node and
 * txn.<how-var> = "hit" (HAProxy adds the var-prefix of spoe-mqtt.conf: txn.mqtt.node,
 * txn.mqtt.how). It does not look at the messages. With several nodes (-n node1,node2,node3)
 * it reads one thing, the `client_id` argument of the first message, and names the node its
 * FNV-1a hash picks: still sticky, and the clients spread over the brokers as the real agent
 * and the native stick table spread them. Everything else is SPOP done properly
 * (doc/SPOE.txt, SPOP 2.0), so HAProxy 2.6 and 3.x accept it:
 *
 *   - HAPROXY-HELLO: supported-versions must list a 2.x, max-frame-size (UINT32/UINT64) and
 *     capabilities must be present. We answer AGENT-HELLO with version "2.0", max-frame-size
 *     = min(ours, HAProxy's) as UINT32, and capabilities "pipelining" if HAProxy offered it
 *     (never "async" or "fragmentation": every ACK goes back on the NOTIFY's connection and
 *     fragmented frames are refused).
 *   - A HELLO with healthcheck=true (HAProxy's `option spop-check`) gets its AGENT-HELLO,
 *     then the connection is closed: that is the whole health-check exchange.
 *   - NOTIFY -> ACK with the same stream-id and frame-id.
 *   - HAPROXY-DISCONNECT -> AGENT-DISCONNECT (status 0), then close.
 *   - A protocol error (frame too big, unknown type, fragment, NOTIFY before HELLO...) ->
 *     AGENT-DISCONNECT with the SPOE.txt status code, then close.
 *
 * I/O: one thread, epoll, non-blocking sockets with TCP_NODELAY. All the frames produced
 * from one read go out in one write(), so a frame is never split across writes unless the
 * socket buffer is full (then the rest waits for EPOLLOUT and nothing more is read from that
 * connection until it is flushed: HAProxy cannot make us buffer without bound).
 *
 * Build (the benchmarks do this into a temporary folder):  gcc -O2 -o floor_spoa floor_spoa.c
 * Run:   floor_spoa -p PORT [-a 127.0.0.1] [-n node2 | -n node1,node2,node3] [-h hit] [-m 16380]
 * It prints "listening on ADDR:PORT" once ready; on SIGTERM/SIGINT it prints its counters
 * (connections, health checks, NOTIFYs, ACKs, disconnects, errors) and exits 0.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

enum { HAPROXY_HELLO = 1, HAPROXY_DISCONNECT = 2, NOTIFY = 3, AGENT_HELLO = 101, AGENT_DISCONNECT = 102, ACK = 103 };
enum { T_NULL, T_BOOL, T_INT32, T_UINT32, T_INT64, T_UINT64, T_IPV4, T_IPV6, T_STRING, T_BINARY };
enum {
    ST_NORMAL = 0, ST_IO = 1, ST_TOO_BIG = 3, ST_INVALID = 4, ST_NO_VERSION = 5, ST_NO_FRAME_SIZE = 6,
    ST_NO_CAPS = 7, ST_BAD_VERSION = 8, ST_BAD_FRAME_SIZE = 9, ST_FRAG = 10, ST_RESOURCE = 13
};
#define FLAG_FIN 1u
#define MIN_FRAME 7u /* type + flags + 1-byte stream-id + 1-byte frame-id */

static uint32_t our_max_frame = 16380; /* HAProxy's default: tune.bufsize 16384 minus the length */
#define MAX_NODES 16
static const char *node = "node2", *how = "hit";
static volatile sig_atomic_t stop;
static unsigned long long n_conns, n_hc, n_notify, n_ack, n_disc, n_err;
static unsigned char acts[MAX_NODES][512]; /* the constant actions of an ACK, one per node */
static size_t acts_len[MAX_NODES];
static int n_nodes;

struct conn {
    int fd;
    int state; /* 0 await HELLO, 1 ready, 2 closing (flush, then close) */
    uint32_t max_frame;
    unsigned char *in;
    size_t in_len, in_cap;
    unsigned char *out;
    size_t out_len, out_off, out_cap;
    int want_out;
};

/* ---- encoding (varints as in SPOE.txt 3.1: 240 + continuation bytes of 7 bits) ---- */

static size_t put_varint(unsigned char *p, uint64_t v) {
    size_t n = 0;
    if (v < 240) { p[n++] = (unsigned char)v; return n; }
    p[n++] = (unsigned char)(v | 240);
    v = (v - 240) >> 4;
    while (v >= 128) { p[n++] = (unsigned char)(v | 128); v = (v - 128) >> 7; }
    p[n++] = (unsigned char)v;
    return n;
}

static size_t put_str(unsigned char *p, const char *s, size_t len) {
    size_t n = put_varint(p, len);
    memcpy(p + n, s, len);
    return n + len;
}

/* ---- decoding: every reader checks its bounds; -1 = malformed ---- */

static int get_varint(const unsigned char *p, size_t end, size_t *pos, uint64_t *out) {
    if (*pos >= end) return -1;
    uint64_t v = p[(*pos)++];
    if (v < 240) { *out = v; return 0; }
    unsigned shift = 4;
    for (;;) {
        if (*pos >= end || shift > 63) return -1;
        uint64_t b = p[(*pos)++];
        v += b << shift;
        shift += 7;
        if (b < 128) break;
    }
    *out = v;
    return 0;
}

/* Skip (or read) one typed value. For STRING/BINARY, s and slen get the bytes, for integers num. */
static int get_typed(const unsigned char *p, size_t end, size_t *pos, int *type, int *flagbits,
                     const unsigned char **s, uint64_t *slen, uint64_t *num) {
    if (*pos >= end) return -1;
    unsigned char tb = p[(*pos)++];
    *type = tb & 0x0F;
    *flagbits = tb >> 4;
    switch (*type) {
    case T_NULL: case T_BOOL: return 0;
    case T_INT32: case T_UINT32: case T_INT64: case T_UINT64: return get_varint(p, end, pos, num);
    case T_IPV4: if (end - *pos < 4) return -1; *pos += 4; return 0;
    case T_IPV6: if (end - *pos < 16) return -1; *pos += 16; return 0;
    case T_STRING: case T_BINARY:
        if (get_varint(p, end, pos, slen) < 0 || *slen > end - *pos) return -1;
        *s = p + *pos;
        *pos += *slen;
        return 0;
    default: return -1;
    }
}

/* Does the comma-separated list `s` hold `item` (spaces around items ignored)? */
static int list_has(const unsigned char *s, size_t len, const char *item, int prefix_only) {
    size_t i = 0, il = strlen(item);
    while (i < len) {
        while (i < len && (s[i] == ' ' || s[i] == ',')) i++;
        size_t j = i;
        while (j < len && s[j] != ',') j++;
        size_t k = j;
        while (k > i && s[k - 1] == ' ') k--;
        if (prefix_only ? (k - i > il && memcmp(s + i, item, il) == 0)
                        : (k - i == il && memcmp(s + i, item, il) == 0))
            return 1;
        i = j;
    }
    return 0;
}

/* ---- output ---- */

static unsigned char *out_reserve(struct conn *c, size_t n) {
    if (c->out_len + n > c->out_cap) {
        size_t cap = c->out_cap ? c->out_cap : 4096;
        while (cap < c->out_len + n) cap *= 2;
        unsigned char *p = realloc(c->out, cap);
        if (!p) return NULL;
        c->out = p;
        c->out_cap = cap;
    }
    return c->out + c->out_len;
}

/* Append one frame: 4-byte length, type, flags, stream-id, frame-id, payload. */
static int out_frame(struct conn *c, int type, uint64_t sid, uint64_t fid, const unsigned char *pl, size_t pl_len) {
    unsigned char *p = out_reserve(c, 4 + 1 + 4 + 10 + 10 + pl_len);
    if (!p) return -1;
    size_t n = 4;
    p[n++] = (unsigned char)type;
    p[n++] = 0; p[n++] = 0; p[n++] = 0; p[n++] = FLAG_FIN;
    n += put_varint(p + n, sid);
    n += put_varint(p + n, fid);
    memcpy(p + n, pl, pl_len);
    n += pl_len;
    uint32_t body = (uint32_t)(n - 4);
    p[0] = body >> 24; p[1] = body >> 16; p[2] = body >> 8; p[3] = body;
    c->out_len += n;
    return 0;
}

static void agent_disconnect(struct conn *c, unsigned status, const char *msg) {
    unsigned char pl[256];
    size_t n = put_str(pl, "status-code", 11);
    pl[n++] = T_UINT32;
    n += put_varint(pl + n, status);
    n += put_str(pl + n, "message", 7);
    pl[n++] = T_STRING;
    n += put_str(pl + n, msg, strlen(msg) < 180 ? strlen(msg) : 180);
    out_frame(c, AGENT_DISCONNECT, 0, 0, pl, n);
    if (status != ST_NORMAL) n_err++;
    c->state = 2;
}

/* ---- frames from HAProxy ---- */

static int on_hello(struct conn *c, const unsigned char *p, size_t end, size_t pos) {
    int have_ver = 0, have_size = 0, have_caps = 0, v2 = 0, pipelining = 0, hc = 0;
    uint64_t size = 0;
    while (pos < end) {
        uint64_t klen, slen = 0, num = 0;
        const unsigned char *s = NULL;
        int type, fl;
        if (get_varint(p, end, &pos, &klen) < 0 || klen > end - pos) return ST_INVALID;
        const unsigned char *key = p + pos;
        pos += klen;
        if (get_typed(p, end, &pos, &type, &fl, &s, &slen, &num) < 0) return ST_INVALID;
#define KEY(k) (klen == sizeof(k) - 1 && memcmp(key, k, klen) == 0)
        if (KEY("supported-versions")) {
            if (type != T_STRING) return ST_INVALID;
            have_ver = 1;
            v2 = list_has(s, slen, "2.", 1) || list_has(s, slen, "2.0", 0);
        } else if (KEY("max-frame-size")) {
            if (type != T_UINT32 && type != T_UINT64) return ST_INVALID;
            have_size = 1;
            size = num;
        } else if (KEY("capabilities")) {
            if (type != T_STRING) return ST_INVALID;
            have_caps = 1;
            pipelining = list_has(s, slen, "pipelining", 0);
        } else if (KEY("healthcheck")) {
            if (type != T_BOOL) return ST_INVALID;
            hc = fl & 1;
        }
#undef KEY
    }
    if (!have_ver) return ST_NO_VERSION;
    if (!have_size) return ST_NO_FRAME_SIZE;
    if (!have_caps) return ST_NO_CAPS;
    if (!v2) return ST_BAD_VERSION;
    if (size < 256) return ST_BAD_FRAME_SIZE;
    c->max_frame = size < our_max_frame ? (uint32_t)size : our_max_frame;
    unsigned char pl[128];
    size_t n = put_str(pl, "version", 7);
    pl[n++] = T_STRING;
    n += put_str(pl + n, "2.0", 3);
    n += put_str(pl + n, "max-frame-size", 14);
    pl[n++] = T_UINT32;
    n += put_varint(pl + n, c->max_frame);
    n += put_str(pl + n, "capabilities", 12);
    pl[n++] = T_STRING;
    n += pipelining ? put_str(pl + n, "pipelining", 10) : put_str(pl + n, "", 0);
    if (out_frame(c, AGENT_HELLO, 0, 0, pl, n) < 0) return ST_RESOURCE;
    if (hc) {
        n_hc++;
        c->state = 2; /* health check: AGENT-HELLO, then close */
    } else {
        c->state = 1;
    }
    return ST_NORMAL;
}

/* With several nodes: the index of the node for the first message's client_id (FNV-1a of its
 * bytes), 0 if it has none; -1 if the payload is malformed. */
static int pick_node(const unsigned char *p, size_t end, size_t pos) {
    uint64_t len, slen = 0, num;
    const unsigned char *s = NULL;
    int type, fl;
    if (pos >= end) return 0; /* no message */
    if (get_varint(p, end, &pos, &len) < 0 || len > end - pos) return -1; /* message name */
    pos += len;
    if (pos >= end) return -1;
    unsigned nb_args = p[pos++];
    for (unsigned i = 0; i < nb_args; i++) {
        if (get_varint(p, end, &pos, &len) < 0 || len > end - pos) return -1;
        int is_cid = len == 9 && memcmp(p + pos, "client_id", 9) == 0;
        pos += len;
        if (get_typed(p, end, &pos, &type, &fl, &s, &slen, &num) < 0) return -1;
        if (is_cid) {
            if (type != T_BINARY && type != T_STRING) return 0;
            uint32_t h = 2166136261u;
            for (uint64_t j = 0; j < slen; j++) h = (h ^ s[j]) * 16777619u;
            return (int)(h % (uint32_t)n_nodes);
        }
    }
    return 0;
}

/* Handle one frame body [p, p+len). Returns a SPOE status (ST_NORMAL = fine). */
static int on_frame(struct conn *c, const unsigned char *p, size_t len) {
    if (len < MIN_FRAME) return ST_INVALID;
    int type = p[0];
    uint32_t flags = (uint32_t)p[1] << 24 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 8 | p[4];
    size_t pos = 5;
    uint64_t sid, fid;
    if (get_varint(p, len, &pos, &sid) < 0 || get_varint(p, len, &pos, &fid) < 0) return ST_INVALID;
    if (type == 0 || !(flags & FLAG_FIN)) return ST_FRAG;
    switch (type) {
    case NOTIFY: {
        if (c->state != 1) return ST_INVALID;
        n_notify++;
        int k = n_nodes > 1 ? pick_node(p, len, pos) : 0;
        if (k < 0) return ST_INVALID;
        if (out_frame(c, ACK, sid, fid, acts[k], acts_len[k]) < 0) return ST_RESOURCE;
        n_ack++;
        return ST_NORMAL;
    }
    case HAPROXY_HELLO:
        if (c->state != 0 || sid || fid) return ST_INVALID;
        return on_hello(c, p, len, pos);
    case HAPROXY_DISCONNECT:
        if (c->state != 1) return ST_INVALID;
        n_disc++;
        agent_disconnect(c, ST_NORMAL, "");
        return ST_NORMAL;
    default:
        return ST_INVALID;
    }
}

static void conn_free(int ep, struct conn *c) {
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    free(c->in);
    free(c->out);
    free(c);
}

/* Write what is queued; returns -1 if the connection is to be dropped. */
static int flush_out(int ep, struct conn *c) {
    while (c->out_off < c->out_len) {
        ssize_t w = write(c->fd, c->out + c->out_off, c->out_len - c->out_off);
        if (w > 0) { c->out_off += (size_t)w; continue; }
        if (w < 0 && errno == EINTR) continue;
        if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            if (!c->want_out) {
                struct epoll_event ev = {.events = EPOLLOUT, .data.ptr = c}; /* no EPOLLIN until flushed */
                epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
                c->want_out = 1;
            }
            return 0;
        }
        return -1;
    }
    c->out_len = c->out_off = 0;
    if (c->want_out) {
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
        epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
        c->want_out = 0;
    }
    return c->state == 2 ? -1 : 0; /* closing and flushed: done */
}

static void on_readable(int ep, struct conn *c) {
    for (;;) {
        size_t room = c->in_cap - c->in_len;
        if (room == 0) { conn_free(ep, c); return; } /* cannot happen: a whole frame always fits */
        ssize_t r = read(c->fd, c->in + c->in_len, room);
        if (r == 0) { conn_free(ep, c); return; }
        if (r < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) break;
            conn_free(ep, c);
            return;
        }
        c->in_len += (size_t)r;
        size_t pos = 0;
        while (c->state != 2 && c->in_len - pos >= 4) {
            const unsigned char *h = c->in + pos;
            uint32_t len = (uint32_t)h[0] << 24 | (uint32_t)h[1] << 16 | (uint32_t)h[2] << 8 | h[3];
            uint32_t limit = c->state == 0 ? our_max_frame : c->max_frame;
            if (len > limit) { agent_disconnect(c, ST_TOO_BIG, "frame too big"); break; }
            if (c->in_len - pos - 4 < len) break;
            int st = on_frame(c, h + 4, len);
            if (st != ST_NORMAL) { agent_disconnect(c, (unsigned)st, "protocol error"); break; }
            pos += 4 + len;
        }
        if (c->state == 2) c->in_len = 0; /* nothing after HELLO(healthcheck)/DISCONNECT/error matters */
        else if (pos) { memmove(c->in, c->in + pos, c->in_len - pos); c->in_len -= pos; }
        if (c->out_len && flush_out(ep, c) < 0) { conn_free(ep, c); return; }
        if (c->want_out) return; /* HAProxy is not reading: stop reading from it too */
        if ((size_t)r < room) break; /* short read: the socket is drained */
    }
}

static void on_signal(int sig) { (void)sig; stop = 1; }

static void usage(const char *argv0) {
    fprintf(stderr, "usage: %s -p PORT [-a ADDR] [-n NODE[,NODE...]] [-h HOW] [-m MAX_FRAME_SIZE]\n", argv0);
    exit(2);
}

int main(int argc, char **argv) {
    const char *addr = "127.0.0.1";
    int port = 0, opt;
    while ((opt = getopt(argc, argv, "a:p:n:h:m:")) != -1) {
        switch (opt) {
        case 'a': addr = optarg; break;
        case 'p': port = atoi(optarg); break;
        case 'n': node = optarg; break;
        case 'h': how = optarg; break;
        case 'm': our_max_frame = (uint32_t)strtoul(optarg, NULL, 10); break;
        default: usage(argv[0]);
        }
    }
    if (port <= 0 || port > 65535 || our_max_frame < 256 || strlen(node) > 2000 || strlen(how) > 200) usage(argv[0]);

    /* The ACK payloads, one per node: two SET-VAR actions (type 1, 3 args, scope txn = 2, name,
     * STRING value). */
    for (const char *nd = node; *nd && n_nodes < MAX_NODES;) {
        size_t nl = strcspn(nd, ",");
        if (nl == 0 || nl > 200) usage(argv[0]);
        unsigned char *a = acts[n_nodes];
        size_t n = 0;
        a[n++] = 1; a[n++] = 3; a[n++] = 2;
        n += put_str(a + n, "node", 4);
        a[n++] = T_STRING;
        n += put_str(a + n, nd, nl);
        a[n++] = 1; a[n++] = 3; a[n++] = 2;
        n += put_str(a + n, "how", 3);
        a[n++] = T_STRING;
        n += put_str(a + n, how, strlen(how));
        acts_len[n_nodes++] = n;
        nd += nl;
        if (*nd == ',') nd++;
    }
    if (n_nodes == 0) usage(argv[0]);

    struct sigaction sa = {0};
    sa.sa_handler = on_signal; /* no SA_RESTART: epoll_wait returns EINTR */
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);

    int ls = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    int one = 1;
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in sin = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    if (inet_pton(AF_INET, addr, &sin.sin_addr) != 1) usage(argv[0]);
    if (bind(ls, (struct sockaddr *)&sin, sizeof sin) < 0 || listen(ls, 1024) < 0) {
        perror("bind/listen");
        return 1;
    }
    int ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event lev = {.events = EPOLLIN, .data.ptr = NULL};
    epoll_ctl(ep, EPOLL_CTL_ADD, ls, &lev);
    printf("listening on %s:%d (node %s, how %s, max-frame-size %u)\n", addr, port, node, how, our_max_frame);
    fflush(stdout);

    struct epoll_event evs[64];
    while (!stop) {
        int k = epoll_wait(ep, evs, 64, -1);
        if (k < 0) {
            if (errno == EINTR) continue;
            perror("epoll_wait");
            return 1;
        }
        for (int i = 0; i < k; i++) {
            struct conn *c = evs[i].data.ptr;
            if (!c) { /* the listener */
                for (;;) {
                    int fd = accept4(ls, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
                    if (fd < 0) break;
                    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    c = calloc(1, sizeof *c);
                    if (c) c->in = malloc(4 + (size_t)our_max_frame);
                    if (!c || !c->in) { free(c); close(fd); continue; }
                    c->fd = fd;
                    c->in_cap = 4 + (size_t)our_max_frame;
                    c->max_frame = our_max_frame;
                    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
                    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
                    n_conns++;
                }
                continue;
            }
            if (c->want_out) {
                if (evs[i].events & (EPOLLERR | EPOLLHUP)) { conn_free(ep, c); continue; }
                if (flush_out(ep, c) < 0) { conn_free(ep, c); continue; }
                if (!c->want_out) on_readable(ep, c); /* flushed: catch up with what arrived meanwhile */
            } else {
                on_readable(ep, c);
            }
        }
    }
    printf("connections %llu healthchecks %llu notify %llu ack %llu haproxy-disconnect %llu errors %llu\n",
           n_conns, n_hc, n_notify, n_ack, n_disc, n_err);
    fflush(stdout);
    return 0;
}
