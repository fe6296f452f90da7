#ifndef CDEVICEMAPPER_H
#define CDEVICEMAPPER_H

// libdevmapper behind an opaque header: what the kernel says about a device-mapper device.

#include <stdint.h>

/// The open count of the device-mapper device MAJOR:MINOR (how many opens the kernel counts: a
/// mount, a process, a device stacked on it). Returns 0, -ENXIO when no such dm device exists,
/// or -EIO when libdevmapper fails.
int cdm_open_count(uint32_t major, uint32_t minor, int32_t *open_count);

#endif
