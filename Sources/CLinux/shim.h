// Linux system calls that Swift's Glibc module does not expose (they need _GNU_SOURCE).
#ifdef __linux__
#include <sys/syscall.h>
#include <unistd.h>

// The calling thread's CPU mask; threads it starts afterwards inherit it. Return the raw
// system call's result: bytes copied (get) or 0 (set) on success, -1 with errno on failure.
static inline long sqz_sched_getaffinity(unsigned long bytes, unsigned long *mask) {
    return syscall(SYS_sched_getaffinity, 0, bytes, mask);
}
static inline long sqz_sched_setaffinity(unsigned long bytes, const unsigned long *mask) {
    return syscall(SYS_sched_setaffinity, 0, bytes, mask);
}
#endif
