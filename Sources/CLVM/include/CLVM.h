#ifndef CLVM_H
#define CLVM_H

// liblvm2cmd behind an opaque header: lvm commands run inside marsd, one at a time.

#include <stddef.h>

/// Runs one lvm command line (words separated by spaces, as lvm2_run splits it). Returns the
/// LVM2_* result code (1: succeeded). The error messages lvm logged are written to `errors`
/// (NUL-terminated, cut at `capacity`).
int clvm_run(const char *command_line, char *errors, size_t capacity);

/// LVM2_COMMAND_SUCCEEDED.
extern const int CLVM_SUCCEEDED;

#endif
