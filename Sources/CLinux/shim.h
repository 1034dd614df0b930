// Linux system calls that Swift's Glibc module does not expose (they need _GNU_SOURCE).
#ifdef __linux__
#include <sys/prctl.h>
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

// The signal the kernel sends this process when the thread that started it ends (PR_SET_PDEATHSIG;
// prctl is variadic, which Swift cannot call). 0 on success, -1 with errno on failure.
static inline int sqz_set_parent_death_signal(int signal) {
    return prctl(PR_SET_PDEATHSIG, (unsigned long)signal, 0UL, 0UL, 0UL);
}
#endif
