/* vsock-helper: AF_VSOCK for the roost demo guest, whose busybox has no vsock applets.
 *
 *   vsock-helper echo <port>          listen on <port> (any CID, backlog 128) and echo every
 *                                     connection in its own process until the peer closes;
 *                                     returns once listening, the server runs on in the background
 *   vsock-helper hello <port> <text>  connect to the host (CID 2) on <port>, send "<text>\n" and
 *                                     close; retries for about 10 s while the host is not listening
 *   vsock-helper bench <port> [vsock|tcp]
 *                                     the bench service on vsock <port> (any CID) and on TCP
 *                                     <port> (any address), or only on the one named; each
 *                                     connection in its own process; returns once listening
 *
 * The bench protocol, the same on both transports: the client sends one line,
 *   "sink <N>\n"    the guest reads exactly N more bytes, answers "done <N>\n"
 *   "source <N>\n"  the guest writes N bytes (the pattern 0, 1, ..., 255, 0, 1, ...)
 * with N a decimal from 0 to 1 GiB; then the guest waits for the client to close (reading and
 * dropping whatever else comes). A bad request line is answered "error <reason>\n". A
 * connection with nothing to read or write for 30 s is closed.
 *
 * It reports on stdout (the console under /init) with the lines /init documents:
 *   roost-vsock: echo listening on <port> | none (<reason>) | echo failed (<reason>)
 *   roost-vsock: hello <port> sent | hello <port> failed (<reason>)
 *   roost-bench: vsock listening on <port> | vsock none (<reason>) | vsock failed (<reason>)
 *   roost-bench: tcp listening on <port> | tcp failed (<reason>)
 * Exit status: 0 on success, 1 on failure (for bench: a transport asked for does not listen,
 * also for want of a vsock device), 2 on a usage error.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <netinet/in.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>
#include <linux/vm_sockets.h>

#define BACKLOG 128
#define HELLO_SECONDS 10
#define BENCH_MAX_BYTES (1LL << 30)  /* the most one bench request moves: 1 GiB */
#define BENCH_LINE_MAX 32            /* a request line's bytes, its newline included */
#define BENCH_IDLE_SECONDS 30        /* a bench connection that neither reads nor writes */
#define BENCH_CHUNK 262144           /* bytes per recv or send of a bench transfer */
#define TCP_PORT_MAX 65535

/* One whole line on stdout with a single write, so lines of concurrent processes never mix. */
static void say(const char *format, ...)
{
    char line[256];
    va_list args;
    va_start(args, format);
    int length = vsnprintf(line, sizeof line - 1, format, args);
    va_end(args);
    if (length < 0)
        return;
    if ((size_t)length > sizeof line - 2)
        length = sizeof line - 2;  /* truncated: still end the line */
    line[length++] = '\n';
    for (int done = 0; done < length;) {
        ssize_t n = write(STDOUT_FILENO, line + done, (size_t)(length - done));
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return;
        done += (int)n;
    }
}

/* A port in 0..UINT_MAX-1 (VMADDR_PORT_ANY is not a port one can name), or -1. */
static long long parse_port(const char *text)
{
    if (*text < '0' || *text > '9')
        return -1;
    errno = 0;
    char *end;
    unsigned long long port = strtoull(text, &end, 10);
    if (errno != 0 || *end != '\0' || port >= VMADDR_PORT_ANY)
        return -1;
    return (long long)port;
}

/* All of buf[0..length) to fd, or -1 with errno set. MSG_NOSIGNAL: a gone peer is EPIPE. */
static int send_all(int fd, const char *buf, size_t length)
{
    while (length > 0) {
        ssize_t n = send(fd, buf, length, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        buf += n;
        length -= (size_t)n;
    }
    return 0;
}

static struct sockaddr_vm vsock_address(unsigned int cid, unsigned int port)
{
    struct sockaddr_vm address;
    memset(&address, 0, sizeof address);
    address.svm_family = AF_VSOCK;
    address.svm_cid = cid;
    address.svm_port = port;
    return address;
}

/* NULL if the guest has a vsock device, else why not. The modules load (and socket() works)
 * without one, so ask the driver for our CID: VMADDR_CID_ANY means no device. */
static const char *no_device(void)
{
    int fd = open("/dev/vsock", O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return errno == ENOENT ? "no /dev/vsock" : strerror(errno);
    unsigned int cid = VMADDR_CID_ANY;
    int failed = ioctl(fd, IOCTL_VM_SOCKETS_GET_LOCAL_CID, &cid);
    int error = errno;
    (void)close(fd);  /* read-only: nothing to lose */
    if (failed < 0)
        return strerror(error);
    return cid == VMADDR_CID_ANY ? "no vsock device" : NULL;
}

/* Echo until the peer closes (or the connection fails), then close: one connection's child. */
static void echo_connection(int fd)
{
    static char buf[65536];
    for (;;) {
        ssize_t n = recv(fd, buf, sizeof buf, 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0 || send_all(fd, buf, (size_t)n) < 0)
            break;
    }
    (void)close(fd);  /* the peer has gone or the connection failed: nothing more to say */
}

/* `fd` bound to `address` and listening (with SO_REUSEADDR first where `reuse`); else -1, `fd`
 * closed and `*failed` naming the call that failed (errno set). */
static int listening(int fd, const struct sockaddr *address, socklen_t size, int reuse,
                     const char **failed)
{
    int on = 1;
    if (reuse && setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &on, sizeof on) < 0)
        *failed = "setsockopt";
    else if (bind(fd, address, size) < 0)
        *failed = "bind";
    else if (listen(fd, BACKLOG) < 0)
        *failed = "listen";
    else
        return fd;
    int error = errno;
    (void)close(fd);  /* never listened: nothing to lose */
    errno = error;
    return -1;
}

/* A vsock socket listening on `port` (any CID); else -1 with `*absent` saying why this guest
 * has no vsock at all, or `*failed` naming the call that failed (errno set). */
static int vsock_listener(unsigned int port, const char **absent, const char **failed)
{
    *absent = no_device();
    if (*absent != NULL)
        return -1;
    int fd = socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        if (errno == EAFNOSUPPORT || errno == ENODEV)
            *absent = strerror(errno);
        else
            *failed = "socket";
        return -1;
    }
    struct sockaddr_vm address = vsock_address(VMADDR_CID_ANY, port);
    return listening(fd, (struct sockaddr *)&address, sizeof address, 0, failed);
}

/* A TCP socket listening on `port` of every IPv4 address, or -1 with `*failed` naming the call
 * that failed (errno set). */
static int tcp_listener(unsigned int port, const char **failed)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        *failed = "socket";
        return -1;
    }
    struct sockaddr_in address;
    memset(&address, 0, sizeof address);
    address.sin_family = AF_INET;
    address.sin_port = htons((unsigned short)port);
    address.sin_addr.s_addr = htonl(INADDR_ANY);
    return listening(fd, (struct sockaddr *)&address, sizeof address, 1, failed);
}

/* Serve `listener` in a background process of its own session that hands each connection to
 * `handle` in a child of its own; `what` prefixes the failures it reports ("<what> failed
 * (accept: ...)"). Returns 0 in the caller once the server runs (the caller keeps its copy of
 * `listener`), or -1 with `*failed` naming the call that failed (errno set). */
static int serve(int listener, void (*handle)(int), const char *what, const char **failed)
{
    /* Children are reaped by the kernel: no zombies, and no handler to interrupt accept(). */
    struct sigaction reap;
    memset(&reap, 0, sizeof reap);
    reap.sa_handler = SIG_IGN;
    reap.sa_flags = SA_NOCLDWAIT;
    if (sigemptyset(&reap.sa_mask) < 0 || sigaction(SIGCHLD, &reap, NULL) < 0) {
        *failed = "sigaction";
        return -1;
    }
    pid_t server = fork();
    if (server < 0) {
        *failed = "fork";
        return -1;
    }
    if (server > 0)  /* the caller goes on: the port accepts connections already */
        return 0;
    if (setsid() < 0) {  /* its own session: no signal for the console's process group */
        say("%s failed (setsid: %s)", what, strerror(errno));
        _exit(1);
    }
    for (;;) {
        int connection = accept4(listener, NULL, NULL, SOCK_CLOEXEC);
        if (connection < 0) {
            int error = errno;
            if (error == EINTR || error == ECONNABORTED)
                continue;
            if (error == EMFILE || error == ENFILE || error == ENOBUFS || error == ENOMEM) {
                (void)sleep(1);  /* out of resources: wait for connections to end */
                continue;
            }
            say("%s failed (accept: %s)", what, strerror(error));
            _exit(1);
        }
        pid_t child = fork();
        if (child == 0) {
            (void)close(listener);
            handle(connection);
            _exit(0);
        }
        if (child < 0)
            (void)sleep(1);  /* cannot serve it: drop it, and let the load go down */
        (void)close(connection);  /* the child has its own copy */
    }
}

static int echo(unsigned int port)
{
    const char *absent = NULL, *failed = NULL;
    int listener = vsock_listener(port, &absent, &failed);
    if (listener < 0) {
        if (absent != NULL)
            say("roost-vsock: none (%s)", absent);
        else
            say("roost-vsock: echo failed (%s: %s)", failed, strerror(errno));
        return 1;
    }
    if (serve(listener, echo_connection, "roost-vsock: echo", &failed) < 0) {
        say("roost-vsock: echo failed (%s: %s)", failed, strerror(errno));
        return 1;
    }
    say("roost-vsock: echo listening on %u", port);
    return 0;
}

/* A bench request's byte count: a decimal from 0 to BENCH_MAX_BYTES, nothing else; or -1. */
static long long parse_count(const char *text)
{
    size_t digits = strspn(text, "0123456789");
    if (digits == 0 || digits > 10 || text[digits] != '\0')
        return -1;
    long long count = strtoll(text, NULL, 10);  /* at most 10 digits: cannot overflow */
    return count <= BENCH_MAX_BYTES ? count : -1;
}

/* "<word> <detail>\n", as one send. */
static int answer(int fd, const char *word, const char *detail)
{
    char line[128];
    int length = snprintf(line, sizeof line, "%s %s\n", word, detail);
    if (length < 0 || (size_t)length >= sizeof line)
        return -1;
    return send_all(fd, line, (size_t)length);
}

/* Read and drop whatever comes until the client closes (or goes idle, or fails). */
static void until_closed(int fd, char *buf, size_t size)
{
    for (;;) {
        ssize_t n = recv(fd, buf, size, 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return;
    }
}

/* Read `count` bytes (of which `already` came with the request line), then say "done". */
static int sink(int fd, long long count, size_t already, char *buf, size_t size)
{
    if ((long long)already > count)
        return answer(fd, "error", "more bytes than the request said");
    long long left = count - (long long)already;
    while (left > 0) {
        size_t want = left < (long long)size ? (size_t)left : size;
        ssize_t n = recv(fd, buf, want, 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return -1;  /* the client went away (or idled) before sending everything */
        left -= n;
    }
    char text[24];
    (void)snprintf(text, sizeof text, "%lld", count);
    return answer(fd, "done", text);
}

/* Write `count` bytes of the pattern 0, 1, ..., 255, 0, 1, ... */
static int source(int fd, long long count, char *buf, size_t size)
{
    for (size_t i = 0; i < size; i++)
        buf[i] = (char)(i & 0xff);  /* size is a multiple of 256: the pattern runs on */
    while (count > 0) {
        size_t length = count < (long long)size ? (size_t)count : size;
        if (send_all(fd, buf, length) < 0)
            return -1;
        count -= (long long)length;
    }
    return 0;
}

/* One bench connection's child: the request line, the transfer, then the client's close. */
static void bench_connection(int fd)
{
    static char buf[BENCH_CHUNK];
    struct timeval idle = {BENCH_IDLE_SECONDS, 0};
    if (setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &idle, sizeof idle) < 0 ||
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &idle, sizeof idle) < 0) {
        (void)close(fd);  /* without a bound, a silent client would hold this process forever */
        return;
    }
    /* The line: at most BENCH_LINE_MAX bytes, so anything after its newline that came in the
     * same reads is a sink's first bytes, fewer than BENCH_LINE_MAX. */
    size_t have = 0;
    char *newline = NULL;
    while (newline == NULL && have < BENCH_LINE_MAX) {
        ssize_t n = recv(fd, buf + have, BENCH_LINE_MAX - have, 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0) {
            (void)close(fd);  /* gone (or idle) before asking anything */
            return;
        }
        newline = memchr(buf + have, '\n', (size_t)n);
        have += (size_t)n;
    }
    int ok;
    if (newline == NULL) {
        ok = answer(fd, "error", "request line too long") == 0;
    } else {
        *newline = '\0';
        size_t after = have - (size_t)(newline + 1 - buf);
        int text = strlen(buf) == (size_t)(newline - buf);  /* no NUL inside the line */
        long long count = -1;
        if (!text)
            ok = answer(fd, "error", "a NUL byte in the request line") == 0;
        else if (strncmp(buf, "sink ", 5) == 0 && (count = parse_count(buf + 5)) >= 0)
            ok = sink(fd, count, after, buf, sizeof buf) == 0;
        else if (strncmp(buf, "source ", 7) == 0 && (count = parse_count(buf + 7)) >= 0)
            ok = source(fd, count, buf, sizeof buf) == 0;
        else
            ok = answer(fd, "error", "expected \"sink <N>\" or \"source <N>\", N <= 1073741824")
                 == 0;
    }
    if (ok)  /* the client closes first: our close cannot cut off what it still reads */
        until_closed(fd, buf, sizeof buf);
    (void)close(fd);
}

enum { BENCH_VSOCK = 1, BENCH_TCP = 2 };

/* The bench service on the transports in `which`: each listening one is served in the
 * background; 0 when every one asked for listens. */
static int bench(unsigned int port, int which)
{
    int status = 0;
    if (which & BENCH_VSOCK) {
        const char *absent = NULL, *failed = NULL;
        int listener = vsock_listener(port, &absent, &failed);
        if (listener >= 0 && serve(listener, bench_connection, "roost-bench: vsock", &failed) == 0)
            say("roost-bench: vsock listening on %u", port);
        else if (absent != NULL)
            say("roost-bench: vsock none (%s)", absent);
        else
            say("roost-bench: vsock failed (%s: %s)", failed, strerror(errno));
        if (listener < 0 || absent != NULL || failed != NULL)
            status = 1;
        if (listener >= 0)
            (void)close(listener);  /* the server has its own copy; the TCP one must not */
    }
    if (which & BENCH_TCP) {
        const char *failed = NULL;
        int listener = tcp_listener(port, &failed);
        if (listener >= 0 && serve(listener, bench_connection, "roost-bench: tcp", &failed) == 0)
            say("roost-bench: tcp listening on %u", port);
        else
            say("roost-bench: tcp failed (%s: %s)", failed, strerror(errno));
        if (listener < 0 || failed != NULL)
            status = 1;
        if (listener >= 0)
            (void)close(listener);
    }
    return status;
}

/* One connection attempt: NULL once "<text>\n" is sent, else the call that failed (and errno). */
static const char *hello_once(unsigned int port, const char *text)
{
    int fd = socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return "socket";
    struct sockaddr_vm address = vsock_address(VMADDR_CID_HOST, port);
    const char *failed = NULL;
    if (connect(fd, (struct sockaddr *)&address, sizeof address) < 0)
        failed = "connect";
    else if (send_all(fd, text, strlen(text)) < 0 || send_all(fd, "\n", 1) < 0)
        failed = "send";
    int error = errno;
    if (close(fd) < 0 && failed == NULL && errno != EINTR)
        return "close";
    errno = error;
    return failed;
}

/* Whether the monotonic clock is still before `deadline` (a failing clock ends the retries). */
static int before(time_t deadline)
{
    struct timespec clock;
    return clock_gettime(CLOCK_MONOTONIC, &clock) == 0 && clock.tv_sec < deadline;
}

static int hello(unsigned int port, const char *text)
{
    const char *absent = no_device();
    if (absent != NULL) {  /* connect() would fail (ENODEV) for as long as we retried */
        say("roost-vsock: hello %u failed (%s)", port, absent);
        return 1;
    }
    struct timespec start;
    time_t deadline = 0;
    if (clock_gettime(CLOCK_MONOTONIC, &start) == 0)
        deadline = start.tv_sec + HELLO_SECONDS;
    for (;;) {
        const char *failed = hello_once(port, text);
        if (failed == NULL) {
            say("roost-vsock: hello %u sent", port);
            return 0;
        }
        int error = errno;
        /* only a refused connect is worth retrying: the host may listen a little later */
        if (strcmp(failed, "connect") != 0 || !before(deadline - 1)) {
            say("roost-vsock: hello %u failed (%s: %s)", port, failed, strerror(error));
            return 1;
        }
        struct timespec pause = {1, 0};
        while (nanosleep(&pause, &pause) < 0 && errno == EINTR)
            ;
    }
}

int main(int argc, char **argv)
{
    if (argc == 3 && strcmp(argv[1], "echo") == 0) {
        long long port = parse_port(argv[2]);
        if (port < 0) {
            say("roost-vsock: echo failed (bad port %.32s)", argv[2]);
            return 2;
        }
        return echo((unsigned int)port);
    }
    if (argc == 4 && strcmp(argv[1], "hello") == 0) {
        long long port = parse_port(argv[2]);
        if (port < 0) {
            say("roost-vsock: hello %.32s failed (bad port)", argv[2]);
            return 2;
        }
        return hello((unsigned int)port, argv[3]);
    }
    if ((argc == 3 || argc == 4) && strcmp(argv[1], "bench") == 0) {
        long long port = parse_port(argv[2]);
        if (port < 1 || port > TCP_PORT_MAX) {
            say("roost-bench: failed (bad port %.32s)", argv[2]);
            return 2;
        }
        int which = BENCH_VSOCK | BENCH_TCP;
        if (argc == 4 && strcmp(argv[3], "vsock") == 0)
            which = BENCH_VSOCK;
        else if (argc == 4 && strcmp(argv[3], "tcp") == 0)
            which = BENCH_TCP;
        else if (argc == 4) {
            say("roost-bench: failed (bad transport %.32s)", argv[3]);
            return 2;
        }
        return bench((unsigned int)port, which);
    }
    fputs("usage: vsock-helper echo <port> | vsock-helper hello <port> <text>"
          " | vsock-helper bench <port> [vsock|tcp]\n",
          stderr);
    return 2;
}
