/* Raw system calls for the escape tests (tests/e2e/test_security.py): busybox cannot make
 * them. Built static by the test and bind-mounted read-only into the container.
 * Each command prints "<name>: ok" or "<name>: errno=<N> (<text>)" and exits 0. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <dirent.h>
#include <sys/mount.h>
#include <sys/ptrace.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/wait.h>
#include <unistd.h>

static void report(const char *name, long result) {
    if (result < 0)
        printf("%s: errno=%d (%s)\n", name, errno, strerror(errno));
    else
        printf("%s: ok\n", name);
}

/* A block device with data: the first /sys/block entry whose size is not 0. */
static int first_block_device(unsigned *major, unsigned *minor) {
    DIR *dir = opendir("/sys/block");
    struct dirent *entry;
    char path[512], text[64];
    if (!dir) return -1;
    while ((entry = readdir(dir))) {
        if (entry->d_name[0] == '.') continue;
        snprintf(path, sizeof path, "/sys/block/%s/size", entry->d_name);
        FILE *f = fopen(path, "r");
        if (!f) continue;
        long size = 0;
        if (fscanf(f, "%ld", &size) != 1) size = 0;
        fclose(f);
        if (size <= 0) continue;
        snprintf(path, sizeof path, "/sys/block/%s/dev", entry->d_name);
        f = fopen(path, "r");
        if (!f) continue;
        int n = fscanf(f, "%u:%u", major, minor);
        fclose(f);
        if (n == 2) { closedir(dir); return 0; }
    }
    closedir(dir);
    (void)text;
    return -1;
}

int main(int argc, char **argv) {
    const char *what = argc > 1 ? argv[1] : "";
    if (!strcmp(what, "keyctl")) {
        report(what, syscall(SYS_keyctl, 0 /* GET_KEYRING_ID */, -3 /* session */, 0));
    } else if (!strcmp(what, "kexec")) {
        /* Invalid flags: with CAP_SYS_BOOT this is EINVAL and changes nothing. */
        report(what, syscall(SYS_kexec_load, 0UL, 0UL, NULL, 0xdead0000UL));
    } else if (!strcmp(what, "unshare-user")) {
        report(what, unshare(CLONE_NEWUSER));
    } else if (!strcmp(what, "init-module")) {
        /* An empty image: EPERM when refused, ENOEXEC/EINVAL/EFAULT when it got through. */
        long r = syscall(SYS_init_module, NULL, 0UL, "");
        if (r < 0 && errno != EPERM) r = 0;
        report(what, r);
    } else if (!strcmp(what, "mount")) {
        mkdir("/tmp/probe-mnt", 0755);
        report(what, mount("probe", "/tmp/probe-mnt", "tmpfs", 0, NULL));
    } else if (!strcmp(what, "remount-rw") && argc > 2) {
        long r = mount(NULL, argv[2], NULL, MS_REMOUNT | MS_BIND, NULL);
        report("remount", r);
        char file[512];
        snprintf(file, sizeof file, "%s/probe-written", argv[2]);
        int fd = open(file, O_WRONLY | O_CREAT, 0644);
        report("write", fd);
    } else if (!strcmp(what, "ptrace-other")) {
        int ready[2];
        if (pipe(ready)) return 2;
        pid_t child = fork();
        if (child == 0) {
            if (setresuid(1000, 1000, 1000)) _exit(3);
            if (write(ready[1], "x", 1) != 1) _exit(4);
            pause();
            _exit(0);
        }
        char c;
        if (read(ready[0], &c, 1) != 1) { printf("ptrace: child failed\n"); return 2; }
        report("ptrace", ptrace(PTRACE_ATTACH, child, NULL, NULL));
        kill(child, SIGKILL);
        waitpid(child, NULL, 0);
    } else if (!strcmp(what, "blockdev")) {
        unsigned major, minor;
        if (first_block_device(&major, &minor)) { printf("blockdev: none found\n"); return 2; }
        unlink("/tmp/probe-blk");
        report("mknod", mknod("/tmp/probe-blk", S_IFBLK | 0600, makedev(major, minor)));
        int fd = open("/tmp/probe-blk", O_RDONLY);
        report("read-open", fd);
        if (fd >= 0) close(fd);
        fd = open("/tmp/probe-blk", O_WRONLY);  /* opened, never written */
        report("write-open", fd);
        if (fd >= 0) close(fd);
        unlink("/tmp/probe-blk");
    } else if (!strcmp(what, "euid")) {
        printf("euid: %d\n", (int)geteuid());
    } else {
        fprintf(stderr, "usage: probe keyctl|kexec|unshare-user|init-module|mount|"
                        "remount-rw DIR|ptrace-other|blockdev|euid\n");
        return 2;
    }
    return 0;
}
