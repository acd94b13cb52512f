/* The floor of the comparison: the least any server can do per keep-alive redirect on this
 * kernel. One epoll loop, one recv and one send per ready connection, no parsing beyond counting
 * request ends, no lookup, a fixed 302 answer of a typical size. What it spends per request is
 * the kernel's TCP path plus almost nothing; a real server's figure above it is its userspace.
 *
 * usage: floor PORT      (listens on 127.0.0.1:PORT until killed)
 * build: cc -O2 -o floor floor.c
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#define EVENTS_MAX 256
#define READ_BYTES 16384
#define ANSWERS_MAX 64

static const char ANSWER[] =
    "HTTP/1.1 302 Found\r\n"
    "location: https://www.example.com/articles/2026/11/a-typical-long-url-of-a-shortened-link\r\n"
    "cache-control: private, max-age=90\r\n"
    "content-length: 0\r\n"
    "date: Mon, 23 Nov 2026 22:00:00 GMT\r\n"
    "\r\n";

/* Request heads that end in buf[0..len). */
static int requests_in(const char *buf, ssize_t len) {
    int count = 0;
    for (ssize_t i = 3; i < len; i++) {
        if (buf[i] == '\n' && buf[i - 1] == '\r' && buf[i - 2] == '\n' && buf[i - 3] == '\r') {
            count++;
        }
    }
    return count;
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: floor PORT\n");
        return 2;
    }
    int port = atoi(argv[1]);
    int listener = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    int one = 1;
    setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(port)};
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(listener, (struct sockaddr *)&addr, sizeof addr) != 0 || listen(listener, 4096) != 0) {
        perror("floor: listen");
        return 1;
    }
    int epoll = epoll_create1(0);
    struct epoll_event event = {.events = EPOLLIN, .data.fd = listener};
    epoll_ctl(epoll, EPOLL_CTL_ADD, listener, &event);
    static struct epoll_event events[EVENTS_MAX];
    static char buf[READ_BYTES];
    static char out[sizeof ANSWER * ANSWERS_MAX];
    for (;;) {
        int ready = epoll_wait(epoll, events, EVENTS_MAX, -1);
        for (int i = 0; i < ready; i++) {
            int fd = events[i].data.fd;
            if (fd == listener) {
                int client;
                while ((client = accept4(listener, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
                    setsockopt(client, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    struct epoll_event add = {.events = EPOLLIN, .data.fd = client};
                    epoll_ctl(epoll, EPOLL_CTL_ADD, client, &add);
                }
                continue;
            }
            ssize_t got = recv(fd, buf, sizeof buf, 0);
            if (got == 0 || (got < 0 && errno != EAGAIN)) {
                close(fd);
                continue;
            }
            int answers = got > 0 ? requests_in(buf, got) : 0;
            if (answers > ANSWERS_MAX) {
                answers = ANSWERS_MAX;
            }
            size_t bytes = 0;
            for (int a = 0; a < answers; a++) {
                memcpy(out + bytes, ANSWER, sizeof ANSWER - 1);
                bytes += sizeof ANSWER - 1;
            }
            if (bytes > 0 && send(fd, out, bytes, MSG_NOSIGNAL) < 0) {
                close(fd);
            }
        }
    }
}
