/* vsock-helper: AF_VSOCK for the roost demo guest, whose busybox has no vsock applets.
 *
 *   vsock-helper echo <port>          listen on <port> (any CID, backlog 128) and echo every
 *                                     connection in its own process until the peer closes;
 *                                     returns once listening, the server runs on in the background
 *   vsock-helper hello <port> <text>  connect to the host (CID 2) on <port>, send "<text>\n" and
 *                                     close; retries for about 10 s while the host is not listening
 *
 * It reports on stdout (the console under /init) with the lines /init documents:
 *   roost-vsock: echo listening on <port> | none (<reason>) | echo failed (<reason>)
 *   roost-vsock: hello <port> sent | hello <port> failed (<reason>)
 * Exit status: 0 on success, 1 on failure, 2 on a usage error.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
#include <linux/vm_sockets.h>

#define BACKLOG 128
#define HELLO_SECONDS 10

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

static int echo(unsigned int port)
{
    const char *absent = no_device();
    if (absent != NULL) {
        say("roost-vsock: none (%s)", absent);
        return 1;
    }
    int listener = socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (listener < 0) {
        int error = errno;
        if (error == EAFNOSUPPORT || error == ENODEV)
            say("roost-vsock: none (%s)", strerror(error));
        else
            say("roost-vsock: echo failed (socket: %s)", strerror(error));
        return 1;
    }
    struct sockaddr_vm address = vsock_address(VMADDR_CID_ANY, port);
    if (bind(listener, (struct sockaddr *)&address, sizeof address) < 0) {
        say("roost-vsock: echo failed (bind: %s)", strerror(errno));
        return 1;
    }
    if (listen(listener, BACKLOG) < 0) {
        say("roost-vsock: echo failed (listen: %s)", strerror(errno));
        return 1;
    }
    /* Children are reaped by the kernel: no zombies, and no handler to interrupt accept(). */
    struct sigaction reap;
    memset(&reap, 0, sizeof reap);
    reap.sa_handler = SIG_IGN;
    reap.sa_flags = SA_NOCLDWAIT;
    if (sigemptyset(&reap.sa_mask) < 0 || sigaction(SIGCHLD, &reap, NULL) < 0) {
        say("roost-vsock: echo failed (sigaction: %s)", strerror(errno));
        return 1;
    }
    pid_t server = fork();
    if (server < 0) {
        say("roost-vsock: echo failed (fork: %s)", strerror(errno));
        return 1;
    }
    if (server > 0) {  /* the caller goes on once the port accepts connections */
        say("roost-vsock: echo listening on %u", port);
        return 0;
    }
    if (setsid() < 0) {  /* its own session: no signal for the console's process group */
        say("roost-vsock: echo failed (setsid: %s)", strerror(errno));
        return 1;
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
            say("roost-vsock: echo failed (accept: %s)", strerror(error));
            return 1;
        }
        pid_t child = fork();
        if (child == 0) {
            (void)close(listener);
            echo_connection(connection);
            _exit(0);
        }
        if (child < 0)
            (void)sleep(1);  /* cannot serve it: drop it, and let the load go down */
        (void)close(connection);  /* the child has its own copy */
    }
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
    fputs("usage: vsock-helper echo <port> | vsock-helper hello <port> <text>\n", stderr);
    return 2;
}
