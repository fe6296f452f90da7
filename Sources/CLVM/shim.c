#include <lvm2cmd.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>

#include "CLVM.h"

const int CLVM_SUCCEEDED = LVM2_COMMAND_SUCCEEDED;

// lvm2_run is not reentrant: one command at a time. Each command gets its own handle, released
// after it, so nothing lvm opened or cached outlives the command inside the long-running marsd.
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static char *collected;
static size_t collected_capacity;
static size_t collected_length;

// lvm's log levels carry flags above the low bits; fatal (2) and error (3) are kept.
static void collect(int level, const char *file, int line, int dm_errno, const char *message) {
    (void)file;
    (void)line;
    (void)dm_errno;
    if ((level & 0x0f) > LVM2_LOG_ERROR || !collected || collected_length + 1 >= collected_capacity) return;
    int written = snprintf(collected + collected_length, collected_capacity - collected_length, "%s%s",
                           collected_length ? "; " : "", message);
    if (written > 0) collected_length += (size_t)written;
    if (collected_length >= collected_capacity) collected_length = collected_capacity - 1;
}

int clvm_run(const char *command_line, char *errors, size_t capacity) {
    pthread_mutex_lock(&lock);
    collected = errors;
    collected_capacity = capacity;
    collected_length = 0;
    if (capacity) errors[0] = 0;
    lvm2_log_fn(collect);
    void *handle = lvm2_init();
    int result = LVM2_INIT_FAILED;
    if (handle) {
        lvm2_disable_dmeventd_monitoring(handle);
        result = lvm2_run(handle, command_line);
        lvm2_exit(handle);
    }
    collected = NULL;
    pthread_mutex_unlock(&lock);
    return result;
}
