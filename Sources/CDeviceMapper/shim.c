#include <errno.h>
#include <libdevmapper.h>

#include "CDeviceMapper.h"

int cdm_open_count(uint32_t major, uint32_t minor, int32_t *open_count) {
    struct dm_task *task = dm_task_create(DM_DEVICE_INFO);
    if (!task) return -EIO;
    struct dm_info info;
    int result = -EIO;
    if (dm_task_set_major(task, (int)major) && dm_task_set_minor(task, (int)minor) && dm_task_run(task) &&
        dm_task_get_info(task, &info)) {
        if (info.exists) {
            *open_count = info.open_count;
            result = 0;
        } else {
            result = -ENXIO;
        }
    }
    dm_task_destroy(task);
    return result;
}
