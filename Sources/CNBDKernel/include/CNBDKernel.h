#ifndef CNBDKERNEL_H
#define CNBDKERNEL_H

// The kernel's NBD client driven over generic netlink (family "nbd"), without libnl, or over the
// older ioctl interface where the kernel lacks that family: the caller has done the NBD handshake
// on each socket and hands over the sockets in transmission phase. Every function returns 0 or
// -errno.

#include <stdint.h>

/// NBD_CMD_CONNECT: /dev/nbd`*index` (or the first free device when `*index` is -1) serves
/// `size` bytes over `sockets`, with the server's transmission flags. Requests time out after
/// `timeout_seconds`; when every socket is dead, requests wait `dead_timeout_seconds` for a
/// reconfigure before they fail. On success `*index` is the device's index.
int cnbd_connect(const int *sockets, int count, uint64_t size, uint64_t block_size, uint64_t server_flags,
                 uint64_t timeout_seconds, uint64_t dead_timeout_seconds, int32_t *index);

/// NBD_CMD_RECONFIGURE: replaces the dead sockets of /dev/nbd`index` with `sockets`.
int cnbd_reconfigure(int32_t index, const int *sockets, int count);

/// NBD_CMD_RECONFIGURE with NBD_ATTR_SIZE_BYTES: /dev/nbd`index`, connected, gets `size` bytes
/// at once (the kernel sets the disk's capacity and tells its users, e.g. for resize2fs); its
/// connection stays. Since Linux 5.3 ("nbd: add netlink reconfigure resize support").
int cnbd_resize(int32_t index, uint64_t size);
/// NBD_CMD_DISCONNECT: ends /dev/nbd`index`'s connection; the device goes back to size 0.
int cnbd_disconnect(int32_t index);

/// NBD_CMD_STATUS: 1 when /dev/nbd`index` is connected, 0 when not. -ENOENT when the kernel has
/// no "nbd" netlink family (module not loaded, or too old).
int cnbd_connected(int32_t index);

/// 1 when the kernel has the "nbd" generic netlink family (nbd.ko loaded, Linux 4.10 or later), 0 when not.
int cnbd_netlink_available(void);

// The ioctl interface: `device` is an open descriptor of /dev/nbdN. The device lives only while a
// thread of the configuring process blocks in cnbd_ioctl_serve; when that process ends, the kernel
// tears the device down (there is no dead-connection wait).

/// NBD_SET_SOCK, NBD_SET_BLKSIZE, NBD_SET_SIZE, NBD_SET_FLAGS, NBD_SET_TIMEOUT: `device` will serve
/// `size` bytes over `socket`. -EBUSY: another task is setting the device up or runs it. On failure
/// the socket is cleared again (NBD_CLEAR_SOCK), so the device stays free.
int cnbd_ioctl_configure(int device, int socket, uint64_t size, uint64_t block_size, uint64_t server_flags,
                         uint64_t timeout_seconds);

/// NBD_DO_IT, then NBD_CLEAR_SOCK: serves the configured device; blocks until it is disconnected
/// (NBD_DISCONNECT, the server closing the connection, or a request timing out). Returns NBD_DO_IT's
/// result: 0 after a requested disconnect.
int cnbd_ioctl_serve(int device);

/// NBD_SET_SIZE on a running device: the kernel sets the disk's capacity at once and tells its
/// users (resize2fs grows a mounted filesystem); the connection stays.
int cnbd_ioctl_resize(int device, uint64_t size);

/// NBD_DISCONNECT (the kernel sends the server NBD_CMD_DISC), then NBD_CLEAR_SOCK (the socket is
/// shut down, so cnbd_ioctl_serve returns even when the server does not close it).
int cnbd_ioctl_disconnect(int device);

#endif
