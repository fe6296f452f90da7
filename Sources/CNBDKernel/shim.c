#include <errno.h>
#include <linux/genetlink.h>
#include <linux/nbd-netlink.h>
#include <linux/nbd.h>
#include <linux/netlink.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>

#include "CNBDKernel.h"

// One request or reply: netlink header, generic netlink header, attributes. Replies of the
// commands used here are far smaller.
enum { MESSAGE_CAPACITY = 8192 };

struct message {
    union {
        struct nlmsghdr header;
        char bytes[MESSAGE_CAPACITY];
    };
};

static struct genlmsghdr *genl_header(struct message *m) { return (struct genlmsghdr *)NLMSG_DATA(&m->header); }

static void start(struct message *m, uint16_t family, uint8_t command) {
    memset(m, 0, sizeof(*m));
    m->header.nlmsg_len = NLMSG_LENGTH(GENL_HDRLEN);
    m->header.nlmsg_type = family;
    m->header.nlmsg_flags = NLM_F_REQUEST | NLM_F_ACK;
    genl_header(m)->cmd = command;
    genl_header(m)->version = 1;
}

static struct nlattr *tail(struct message *m) { return (struct nlattr *)(m->bytes + NLMSG_ALIGN(m->header.nlmsg_len)); }

static struct nlattr *put(struct message *m, uint16_t type, const void *data, uint16_t length) {
    struct nlattr *attribute = tail(m);
    uint32_t total = NLMSG_ALIGN(m->header.nlmsg_len) + NLA_ALIGN(NLA_HDRLEN + length);
    if (total > MESSAGE_CAPACITY) return NULL;
    attribute->nla_type = type;
    attribute->nla_len = NLA_HDRLEN + length;
    if (length) memcpy((char *)attribute + NLA_HDRLEN, data, length);
    m->header.nlmsg_len = total;
    return attribute;
}

static int put_u64(struct message *m, uint16_t type, uint64_t value) { return put(m, type, &value, sizeof value) ? 0 : -EMSGSIZE; }
static int put_u32(struct message *m, uint16_t type, uint32_t value) { return put(m, type, &value, sizeof value) ? 0 : -EMSGSIZE; }

// A nested attribute: open it, add members, then close it to fix its length.
static struct nlattr *open_nest(struct message *m, uint16_t type) { return put(m, type | NLA_F_NESTED, NULL, 0); }
static void close_nest(struct message *m, struct nlattr *nest) { nest->nla_len = (uint16_t)((char *)tail(m) - (char *)nest); }

static int put_sockets(struct message *m, const int *sockets, int count) {
    struct nlattr *list = open_nest(m, NBD_ATTR_SOCKETS);
    if (!list) return -EMSGSIZE;
    for (int i = 0; i < count; i++) {
        struct nlattr *item = open_nest(m, NBD_SOCK_ITEM);
        if (!item || put_u32(m, NBD_SOCK_FD, (uint32_t)sockets[i]) < 0) return -EMSGSIZE;
        close_nest(m, item);
    }
    close_nest(m, list);
    return 0;
}

// Sends `request` and reads until the kernel's ack. A reply carrying data is copied to `reply`
// (when given). Returns 0 or the kernel's -errno.
static int transact(struct message *request, struct message *reply) {
    int fd = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_GENERIC);
    if (fd < 0) return -errno;
    struct sockaddr_nl kernel = {.nl_family = AF_NETLINK};
    int result = 0;
    if (sendto(fd, request, request->header.nlmsg_len, 0, (struct sockaddr *)&kernel, sizeof kernel) < 0) {
        result = -errno;
        goto done;
    }
    struct message incoming;
    for (;;) {
        ssize_t n = recv(fd, &incoming, sizeof incoming, 0);
        if (n < 0) {
            if (errno == EINTR) continue;
            result = -errno;
            goto done;
        }
        for (struct nlmsghdr *h = &incoming.header; NLMSG_OK(h, (size_t)n); h = NLMSG_NEXT(h, n)) {
            if (h->nlmsg_type == NLMSG_ERROR) {
                struct nlmsgerr *error = (struct nlmsgerr *)NLMSG_DATA(h);
                result = error->error; // 0 is the ack
                goto done;
            }
            if (reply && h->nlmsg_len <= sizeof *reply) memcpy(reply, h, h->nlmsg_len);
        }
    }
done:
    close(fd);
    return result;
}

// The first attribute of `type` among those from `first` to the end of `m`'s payload (or of `limit`).
static struct nlattr *find(struct nlattr *first, const char *end, uint16_t type) {
    for (struct nlattr *a = first; (const char *)a + NLA_HDRLEN <= end && a->nla_len >= NLA_HDRLEN;
         a = (struct nlattr *)((char *)a + NLA_ALIGN(a->nla_len))) {
        if ((a->nla_type & NLA_TYPE_MASK) == type) return a;
    }
    return NULL;
}

static struct nlattr *first_attribute(struct message *m) { return (struct nlattr *)((char *)genl_header(m) + GENL_HDRLEN); }
static const char *end_of(struct message *m) { return m->bytes + m->header.nlmsg_len; }

static int nbd_family(uint16_t *family) {
    struct message request, reply;
    start(&request, GENL_ID_CTRL, CTRL_CMD_GETFAMILY);
    if (!put(&request, CTRL_ATTR_FAMILY_NAME, NBD_GENL_FAMILY_NAME, sizeof NBD_GENL_FAMILY_NAME)) return -EMSGSIZE;
    memset(&reply, 0, sizeof reply);
    int result = transact(&request, &reply);
    if (result < 0) return result; // -ENOENT: no such family
    struct nlattr *id = find(first_attribute(&reply), end_of(&reply), CTRL_ATTR_FAMILY_ID);
    if (!id) return -ENOENT;
    memcpy(family, (char *)id + NLA_HDRLEN, sizeof *family);
    return 0;
}

int cnbd_connect(const int *sockets, int count, uint64_t size, uint64_t block_size, uint64_t server_flags,
                 uint64_t timeout_seconds, uint64_t dead_timeout_seconds, int32_t *index) {
    uint16_t family;
    int result = nbd_family(&family);
    if (result < 0) return result;
    struct message request, reply;
    start(&request, family, NBD_CMD_CONNECT);
    if (*index >= 0 && put_u32(&request, NBD_ATTR_INDEX, (uint32_t)*index) < 0) return -EMSGSIZE;
    if (put_u64(&request, NBD_ATTR_SIZE_BYTES, size) < 0 || put_u64(&request, NBD_ATTR_BLOCK_SIZE_BYTES, block_size) < 0 ||
        put_u64(&request, NBD_ATTR_SERVER_FLAGS, server_flags) < 0 || put_u64(&request, NBD_ATTR_TIMEOUT, timeout_seconds) < 0 ||
        put_u64(&request, NBD_ATTR_DEAD_CONN_TIMEOUT, dead_timeout_seconds) < 0)
        return -EMSGSIZE;
    if ((result = put_sockets(&request, sockets, count)) < 0) return result;
    memset(&reply, 0, sizeof reply);
    if ((result = transact(&request, &reply)) < 0) return result;
    struct nlattr *assigned = find(first_attribute(&reply), end_of(&reply), NBD_ATTR_INDEX);
    if (!assigned) return -EPROTO;
    uint32_t value;
    memcpy(&value, (char *)assigned + NLA_HDRLEN, sizeof value);
    *index = (int32_t)value;
    return 0;
}

int cnbd_reconfigure(int32_t index, const int *sockets, int count) {
    uint16_t family;
    int result = nbd_family(&family);
    if (result < 0) return result;
    struct message request;
    start(&request, family, NBD_CMD_RECONFIGURE);
    if (put_u32(&request, NBD_ATTR_INDEX, (uint32_t)index) < 0) return -EMSGSIZE;
    if ((result = put_sockets(&request, sockets, count)) < 0) return result;
    return transact(&request, NULL);
}

int cnbd_resize(int32_t index, uint64_t size) {
    uint16_t family;
    int result = nbd_family(&family);
    if (result < 0) return result;
    struct message request;
    start(&request, family, NBD_CMD_RECONFIGURE);
    if (put_u32(&request, NBD_ATTR_INDEX, (uint32_t)index) < 0 || put_u64(&request, NBD_ATTR_SIZE_BYTES, size) < 0) return -EMSGSIZE;
    return transact(&request, NULL);
}

int cnbd_disconnect(int32_t index) {
    uint16_t family;
    int result = nbd_family(&family);
    if (result < 0) return result;
    struct message request;
    start(&request, family, NBD_CMD_DISCONNECT);
    if (put_u32(&request, NBD_ATTR_INDEX, (uint32_t)index) < 0) return -EMSGSIZE;
    return transact(&request, NULL);
}

int cnbd_connected(int32_t index) {
    uint16_t family;
    int result = nbd_family(&family);
    if (result < 0) return result;
    struct message request, reply;
    start(&request, family, NBD_CMD_STATUS);
    if (put_u32(&request, NBD_ATTR_INDEX, (uint32_t)index) < 0) return -EMSGSIZE;
    memset(&reply, 0, sizeof reply);
    if ((result = transact(&request, &reply)) < 0) return result;
    // [NBD_ATTR_DEVICE_LIST] [NBD_DEVICE_ITEM] [NBD_DEVICE_INDEX] [NBD_DEVICE_CONNECTED]
    struct nlattr *list = find(first_attribute(&reply), end_of(&reply), NBD_ATTR_DEVICE_LIST);
    if (!list) return 0;
    const char *list_end = (char *)list + list->nla_len;
    struct nlattr *item = find((struct nlattr *)((char *)list + NLA_HDRLEN), list_end, NBD_DEVICE_ITEM);
    if (!item) return 0;
    struct nlattr *connected = find((struct nlattr *)((char *)item + NLA_HDRLEN), (char *)item + item->nla_len, NBD_DEVICE_CONNECTED);
    if (!connected) return 0;
    uint8_t value;
    memcpy(&value, (char *)connected + NLA_HDRLEN, 1);
    return value ? 1 : 0;
}

int cnbd_netlink_available(void) {
    uint16_t family;
    int result = nbd_family(&family);
    if (result == -ENOENT) return 0;
    return result < 0 ? result : 1;
}

static int nbd_ioctl(int device, unsigned long request, unsigned long argument) {
    return ioctl(device, request, argument) < 0 ? -errno : 0;
}

int cnbd_ioctl_configure(int device, int socket, uint64_t size, uint64_t block_size, uint64_t server_flags,
                         uint64_t timeout_seconds) {
    // The socket first: it claims the device for this task (-EBUSY when another one has).
    int result = nbd_ioctl(device, NBD_SET_SOCK, (unsigned long)socket);
    if (result < 0) return result;
    if ((result = nbd_ioctl(device, NBD_SET_BLKSIZE, block_size)) < 0 || (result = nbd_ioctl(device, NBD_SET_SIZE, size)) < 0 ||
        (result = nbd_ioctl(device, NBD_SET_FLAGS, server_flags)) < 0 ||
        (result = nbd_ioctl(device, NBD_SET_TIMEOUT, timeout_seconds)) < 0) {
        nbd_ioctl(device, NBD_CLEAR_SOCK, 0);
        return result;
    }
    return 0;
}

int cnbd_ioctl_serve(int device) {
    // Not retried on EINTR: a signal has made the kernel shut the connection down already.
    int result = nbd_ioctl(device, NBD_DO_IT, 0);
    nbd_ioctl(device, NBD_CLEAR_SOCK, 0);
    return result;
}

int cnbd_ioctl_resize(int device, uint64_t size) { return nbd_ioctl(device, NBD_SET_SIZE, size); }

int cnbd_ioctl_disconnect(int device) {
    int result = nbd_ioctl(device, NBD_DISCONNECT, 0);
    if (result < 0) return result;
    return nbd_ioctl(device, NBD_CLEAR_SOCK, 0);
}
