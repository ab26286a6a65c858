/*
 * Guest side of the QEMU interop tier: drives vfud's ats-dma device from inside a Linux guest
 * and reports every check on stdout (the serial console), one "VFUD-GUEST" line each, ending
 * with "VFUD-GUEST RESULT PASS" or "VFUD-GUEST RESULT FAIL: <why>". The host asserts on these
 * lines; this program only measures and reports. Every wait has a deadline.
 *
 * What it does, in order:
 *   1. finds the device (vendor 0x1b36, device 0x00fd) in sysfs;
 *   2. reads its config space from sysfs and prints the standard and extended capability IDs;
 *   3. binds uio_pci_generic (which only binds if the device implements INTx masking: Command
 *      bit 10 INTx Disable and Status bit 3 Interrupt Status), opens /dev/uioN, enables memory
 *      decoding and bus mastering;
 *   4. mmaps BAR0 (sysfs resource0) and checks the ID and VERSION registers;
 *   5. DMA: FILL a page, COPY a page to another, CHECKSUM a page, each into or from mlocked
 *      buffers whose physical addresses come from /proc/self/pagemap, polling STATUS;
 *   6. interrupts: two FILLs with CMD_IRQ, each waited for on /dev/uioN, checking Interrupt
 *      Status, that the kernel handler set INTx Disable, that clearing IRQ_STATUS drops
 *      Interrupt Status, and that the device's line in /proc/interrupts counted up.
 *
 * Build: gcc -static -O2 -Wall -Wextra -o ats-dma-test ats-dma-test.c
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define VENDOR 0x1b36
#define DEVICE 0x00fd
#define BAR0_SIZE 0x4000
#define PAGE 4096

/* BAR0 registers (docs/ats-dma.md). */
#define REG_ID 0x00
#define REG_VERSION 0x04
#define REG_SRC_LO 0x08
#define REG_SRC_HI 0x0c
#define REG_DST_LO 0x10
#define REG_DST_HI 0x14
#define REG_LEN 0x18
#define REG_PATTERN 0x1c
#define REG_CMD 0x20
#define REG_STATUS 0x24
#define REG_ERROR 0x28
#define REG_RESULT 0x2c
#define REG_IRQ_STATUS 0x34
#define REG_CAP_CONTROL 0x40
#define REG_ATS_REQUESTS 0x48
#define REG_ATC_HITS 0x4c
#define REG_ATC_MISSES 0x50
#define REG_ATC_ENTRIES 0x58
#define CAP_CONTROL_ATS_ENABLE 0x1
#define EXT_CAP_ID_ATS 0x000f
#define ATS_CONTROL_ENABLE 0x8000
#define OP_COPY 1
#define OP_FILL 2
#define OP_CHECKSUM 3
#define CMD_IRQ 0x100
#define STATUS_BUSY 1
#define STATUS_DONE 2

/* PCI config space. */
#define PCI_COMMAND 0x04
#define PCI_STATUS 0x06
#define PCI_COMMAND_MEMORY 0x0002
#define PCI_COMMAND_MASTER 0x0004
#define PCI_COMMAND_INTX_DISABLE 0x0400
#define PCI_STATUS_INTERRUPT 0x0008

#define WAIT_SECONDS 30

static char dev_path[512];
static int config_fd = -1;
static volatile uint32_t *bar0;

static void fail(const char *fmt, ...)
{
    va_list ap;
    printf("VFUD-GUEST RESULT FAIL: ");
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    printf("\n");
    fflush(stdout);
    exit(1);
}

static void report(const char *fmt, ...)
{
    va_list ap;
    printf("VFUD-GUEST ");
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    printf("\n");
    fflush(stdout);
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static unsigned long read_hex_file(const char *dir, const char *name)
{
    char path[600], buf[64] = {0};
    snprintf(path, sizeof(path), "%s/%s", dir, name);
    int fd = open(path, O_RDONLY);
    if (fd < 0)
        return ~0UL;
    ssize_t n = read(fd, buf, sizeof(buf) - 1);
    close(fd);
    if (n <= 0)
        return ~0UL;
    return strtoul(buf, NULL, 0);
}

static void write_file(const char *path, const char *text)
{
    int fd = open(path, O_WRONLY);
    if (fd < 0)
        fail("open %s: %s", path, strerror(errno));
    if (write(fd, text, strlen(text)) != (ssize_t)strlen(text))
        fail("write '%s' to %s: %s", text, path, strerror(errno));
    close(fd);
}

static void find_device(void)
{
    DIR *d = opendir("/sys/bus/pci/devices");
    struct dirent *e;
    if (!d)
        fail("opendir /sys/bus/pci/devices: %s", strerror(errno));
    while ((e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.')
            continue;
        char dir[512];
        snprintf(dir, sizeof(dir), "/sys/bus/pci/devices/%s", e->d_name);
        if (read_hex_file(dir, "vendor") == VENDOR && read_hex_file(dir, "device") == DEVICE) {
            snprintf(dev_path, sizeof(dev_path), "%s", dir);
            report("device %s vendor=0x%04x device=0x%04x class=0x%06lx", e->d_name, VENDOR,
                   DEVICE, read_hex_file(dir, "class"));
            closedir(d);
            return;
        }
    }
    closedir(d);
    fail("no PCI device %04x:%04x found", VENDOR, DEVICE);
}

static uint16_t cfg_read16(unsigned off)
{
    uint16_t v;
    if (pread(config_fd, &v, 2, off) != 2)
        fail("config read at 0x%x: %s", off, strerror(errno));
    return v;
}

static void cfg_write16(unsigned off, uint16_t v)
{
    if (pwrite(config_fd, &v, 2, off) != 2)
        fail("config write at 0x%x: %s", off, strerror(errno));
}

static void print_capabilities(void)
{
    uint8_t cfg[4096];
    ssize_t n = pread(config_fd, cfg, sizeof(cfg), 0);
    if (n < 256)
        fail("reading config space: got %zd bytes", n);
    char std[256] = "", ext[512] = "";
    size_t sl = 0, el = 0;
    unsigned ptr = cfg[0x34] & 0xfc;
    for (int i = 0; ptr >= 0x40 && ptr < 0x100 && i < 48; i++) {
        sl += snprintf(std + sl, sizeof(std) - sl, "%s%02x", sl ? "," : "", cfg[ptr]);
        ptr = cfg[ptr + 1] & 0xfc;
    }
    unsigned off = 0x100;
    for (int i = 0; n >= 4096 && off >= 0x100 && off < 4096 && i < 64; i++) {
        uint32_t h;
        memcpy(&h, cfg + off, 4);
        if (h == 0 || h == 0xffffffff)
            break;
        el += snprintf(ext + el, sizeof(ext) - el, "%s%04x", el ? "," : "", h & 0xffff);
        off = (h >> 20) & 0xffc;
        if (off == 0)
            break;
    }
    report("config bytes=%zd command=0x%04x status=0x%04x", n, cfg[4] | cfg[5] << 8,
           cfg[6] | cfg[7] << 8);
    report("caps std=%s ext=%s", std[0] ? std : "-", ext[0] ? ext : "-");
}

static uint32_t rd(unsigned off) { return bar0[off / 4]; }
static void wr(unsigned off, uint32_t v) { bar0[off / 4] = v; }

static uint64_t phys_of(void *p)
{
    static int fd = -1;
    if (fd < 0 && (fd = open("/proc/self/pagemap", O_RDONLY)) < 0)
        fail("open pagemap: %s", strerror(errno));
    uint64_t entry;
    off_t at = (off_t)((uintptr_t)p / PAGE) * 8;
    if (pread(fd, &entry, 8, at) != 8)
        fail("read pagemap: %s", strerror(errno));
    if (!(entry & (1ULL << 63)))
        fail("page %p not present", p);
    uint64_t pfn = entry & ((1ULL << 55) - 1);
    if (pfn == 0)
        fail("pagemap shows PFN 0 (no CAP_SYS_ADMIN?)");
    return pfn * PAGE + ((uintptr_t)p % PAGE);
}

/* Starts a command and polls STATUS until it leaves BUSY; fails on timeout or error. */
static void run(const char *what, uint32_t op, uint64_t src, uint64_t dst, uint32_t len,
                uint32_t pattern, int irq)
{
    wr(REG_SRC_LO, (uint32_t)src);
    wr(REG_SRC_HI, (uint32_t)(src >> 32));
    wr(REG_DST_LO, (uint32_t)dst);
    wr(REG_DST_HI, (uint32_t)(dst >> 32));
    wr(REG_LEN, len);
    wr(REG_PATTERN, pattern);
    wr(REG_CMD, op | (irq ? CMD_IRQ : 0));
    double deadline = now() + WAIT_SECONDS;
    uint32_t s;
    while ((s = rd(REG_STATUS)) == STATUS_BUSY) {
        if (now() > deadline)
            fail("%s: STATUS still BUSY after %d s", what, WAIT_SECONDS);
    }
    if (s != STATUS_DONE)
        fail("%s: STATUS=%u ERROR=%u", what, s, rd(REG_ERROR));
}

/* Offset of extended capability `id` in config space, 0 if absent. */
static unsigned find_ext_cap(uint16_t id)
{
    unsigned off = 0x100;
    for (int i = 0; off >= 0x100 && off < 4096 && i < 64; i++) {
        uint32_t h;
        if (pread(config_fd, &h, 4, off) != 4)
            return 0;
        if (h == 0 || h == 0xffffffff)
            return 0;
        if ((h & 0xffff) == id)
            return off;
        off = (h >> 20) & 0xffc;
    }
    return 0;
}

/* ATS: set Enable in the ATS Control register, as a driver does; the device then translates
 * every address through its ATC (vfud's shadow source answers from QEMU's DMA maps): misses on
 * the first copy, hits only on the repeat. Leaves ATS disabled again. */
static void ats_round(uint64_t src, uint64_t dst, const uint8_t *b, uint8_t *c)
{
    unsigned ats = find_ext_cap(EXT_CAP_ID_ATS);
    if (!ats) {
        report("ats absent");
        return;
    }
    cfg_write16(ats + 6, ATS_CONTROL_ENABLE);
    uint16_t control = cfg_read16(ats + 6);
    if (!(rd(REG_CAP_CONTROL) & CAP_CONTROL_ATS_ENABLE))
        fail("ats: ATS Control reads 0x%04x but the device's CAP_CONTROL is 0x%08x", control,
             rd(REG_CAP_CONTROL));
    memset(c, 0, PAGE);
    run("ats copy", OP_COPY, src, dst, PAGE, 0, 0);
    if (memcmp(b, c, PAGE) != 0)
        fail("ats copy: destination differs from source");
    uint32_t requests = rd(REG_ATS_REQUESTS), misses = rd(REG_ATC_MISSES), hits = rd(REG_ATC_HITS);
    if (requests == 0 || misses == 0)
        fail("ats copy: no translation request (requests=%u misses=%u)", requests, misses);
    memset(c, 0, PAGE);
    run("ats copy again", OP_COPY, src, dst, PAGE, 0, 0);
    if (memcmp(b, c, PAGE) != 0)
        fail("ats copy again: destination differs from source");
    uint32_t misses2 = rd(REG_ATC_MISSES), hits2 = rd(REG_ATC_HITS);
    if (misses2 != misses || hits2 <= hits)
        fail("ats copy again: misses %u->%u hits %u->%u, want hits only", misses, misses2, hits,
             hits2);
    uint32_t entries = rd(REG_ATC_ENTRIES);
    cfg_write16(ats + 6, 0);
    report("ats ok control=0x%04x requests=%u misses=%u hits=%u->%u entries=%u", control,
           requests, misses, hits, hits2, entries);
}

static uint32_t crc32_ieee(const uint8_t *p, size_t n)
{
    uint32_t c = 0xffffffff;
    for (size_t i = 0; i < n; i++) {
        c ^= p[i];
        for (int k = 0; k < 8; k++)
            c = (c >> 1) ^ (0xedb88320 & -(c & 1));
    }
    return ~c;
}

static void check_fill(const char *what, const uint8_t *buf, uint32_t pattern)
{
    for (int i = 0; i < PAGE; i++) {
        uint8_t want = (uint8_t)(pattern >> (8 * (i % 4)));
        if (buf[i] != want)
            fail("%s: byte %d is 0x%02x, want 0x%02x", what, i, buf[i], want);
    }
}

/* Sum of the per-CPU counts of IRQ `irq` in /proc/interrupts, or -1 if absent. */
static long proc_interrupts(int irq)
{
    FILE *f = fopen("/proc/interrupts", "r");
    char line[1024];
    long total = -1;
    if (!f)
        fail("open /proc/interrupts: %s", strerror(errno));
    while (fgets(line, sizeof(line), f)) {
        char *p = line, *end;
        long n = strtol(p, &end, 10);
        if (end == p || *end != ':' || n != irq)
            continue;
        total = 0;
        p = end + 1;
        for (;;) {
            long v = strtol(p, &end, 10);
            if (end == p)
                break;
            total += v;
            p = end;
        }
        break;
    }
    fclose(f);
    return total;
}

static int open_uio(void)
{
    char path[600];
    snprintf(path, sizeof(path), "%s/uio", dev_path);
    DIR *d = opendir(path);
    struct dirent *e;
    if (!d)
        fail("no %s: uio_pci_generic did not bind", path);
    while ((e = readdir(d)) != NULL) {
        if (strncmp(e->d_name, "uio", 3) == 0) {
            char node[300];
            snprintf(node, sizeof(node), "/dev/%s", e->d_name);
            closedir(d);
            int fd = open(node, O_RDWR);
            if (fd < 0)
                fail("open %s: %s", node, strerror(errno));
            report("uio %s", node);
            return fd;
        }
    }
    closedir(d);
    fail("no uio device under %s", path);
    return -1;
}

static void bind_uio(void)
{
    char link[600], target[600] = {0};
    write_file("/sys/bus/pci/drivers/uio_pci_generic/new_id", "1b36 00fd");
    snprintf(link, sizeof(link), "%s/driver", dev_path);
    if (readlink(link, target, sizeof(target) - 1) < 0)
        fail("uio_pci_generic did not bind (does the device implement INTx masking?)");
    const char *name = strrchr(target, '/');
    name = name ? name + 1 : target;
    if (strcmp(name, "uio_pci_generic") != 0)
        fail("device is bound to %s, not uio_pci_generic", name);
    report("driver uio_pci_generic bound");
}

/* One interrupt round: FILL with CMD_IRQ, wait for the uio event, acknowledge, re-enable. */
static void irq_round(int round, int uio, int irq, uint8_t *buf, uint64_t pa, uint32_t *events)
{
    char what[64];
    long before = proc_interrupts(irq);
    uint32_t pattern = 0x11223344u * (uint32_t)round + 0x0f0f0f0fu;
    snprintf(what, sizeof(what), "irq round %d", round);
    memset(buf, 0, PAGE);
    wr(REG_IRQ_STATUS, 1);
    run(what, OP_FILL, 0, pa, PAGE, pattern, 1);
    check_fill(what, buf, pattern);

    struct pollfd p = {.fd = uio, .events = POLLIN};
    int r = poll(&p, 1, WAIT_SECONDS * 1000);
    if (r < 0)
        fail("%s: poll /dev/uio: %s", what, strerror(errno));
    if (r == 0)
        fail("%s: no interrupt within %d s (IRQ %d count %ld -> %ld)", what, WAIT_SECONDS, irq,
             before, proc_interrupts(irq));
    uint32_t count;
    if (read(uio, &count, 4) != 4)
        fail("%s: read /dev/uio: %s", what, strerror(errno));
    if (count <= *events)
        fail("%s: uio event count %u did not rise above %u", what, count, *events);
    *events = count;

    /* The device still asserts INTx (IRQ_STATUS is set): Interrupt Status reads 1, and the
     * kernel's uio_pci_generic handler masked the line with INTx Disable. */
    uint16_t status = cfg_read16(PCI_STATUS), command = cfg_read16(PCI_COMMAND);
    if (!(status & PCI_STATUS_INTERRUPT))
        fail("%s: Interrupt Status is clear while IRQ_STATUS=%u", what, rd(REG_IRQ_STATUS));
    if (!(command & PCI_COMMAND_INTX_DISABLE))
        fail("%s: the kernel did not set INTx Disable (command 0x%04x)", what, command);
    /* Acknowledge in the device: the line drops, and so does Interrupt Status. */
    wr(REG_IRQ_STATUS, 1);
    status = cfg_read16(PCI_STATUS);
    if (status & PCI_STATUS_INTERRUPT)
        fail("%s: Interrupt Status still set after clearing IRQ_STATUS", what);
    cfg_write16(PCI_COMMAND, command & ~PCI_COMMAND_INTX_DISABLE);
    long after = proc_interrupts(irq);
    if (after <= before)
        fail("%s: /proc/interrupts count of IRQ %d did not rise (%ld -> %ld)", what, irq,
             before, after);
    report("irq round %d ok uio_events=%u irq=%d proc_interrupts=%ld->%ld", round, count, irq,
           before, after);
}

int main(void)
{
    char path[600];
    setvbuf(stdout, NULL, _IOLBF, 0);
    find_device();

    snprintf(path, sizeof(path), "%s/config", dev_path);
    config_fd = open(path, O_RDWR);
    if (config_fd < 0)
        fail("open %s: %s", path, strerror(errno));
    print_capabilities();

    bind_uio();
    int uio = open_uio();
    uint16_t command = cfg_read16(PCI_COMMAND);
    cfg_write16(PCI_COMMAND, (command | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER) &
                                 ~PCI_COMMAND_INTX_DISABLE);
    command = cfg_read16(PCI_COMMAND);
    if ((command & (PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER)) !=
        (PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER))
        fail("command register reads 0x%04x after enabling memory and bus master", command);
    report("command=0x%04x", command);

    snprintf(path, sizeof(path), "%s/resource0", dev_path);
    int res = open(path, O_RDWR | O_SYNC);
    if (res < 0)
        fail("open %s: %s", path, strerror(errno));
    void *m = mmap(NULL, BAR0_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, res, 0);
    if (m == MAP_FAILED)
        fail("mmap %s: %s", path, strerror(errno));
    bar0 = m;
    uint32_t id = rd(REG_ID), version = rd(REG_VERSION);
    if (id != 0x414d4441)
        fail("BAR0 ID reads 0x%08x, want 0x414d4441", id);
    report("bar0 id=0x%08x version=0x%08x", id, version);

    uint8_t *pages = mmap(NULL, 3 * PAGE, PROT_READ | PROT_WRITE,
                          MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    if (pages == MAP_FAILED)
        fail("mmap buffers: %s", strerror(errno));
    if (mlock(pages, 3 * PAGE) != 0)
        fail("mlock: %s", strerror(errno));
    uint8_t *a = pages, *b = pages + PAGE, *c = pages + 2 * PAGE;
    memset(pages, 0, 3 * PAGE);
    uint64_t pa = phys_of(a), pb = phys_of(b), pc = phys_of(c);
    report("buffers phys a=0x%llx b=0x%llx c=0x%llx", (unsigned long long)pa,
           (unsigned long long)pb, (unsigned long long)pc);

    /* FILL: the device writes guest memory. */
    run("fill", OP_FILL, 0, pa, PAGE, 0xa5c30f1e, 0);
    check_fill("fill", a, 0xa5c30f1e);
    report("dma fill ok len=%d", PAGE);

    /* COPY: the device reads one page and writes another. */
    uint32_t x = 0x9e3779b9;
    for (int i = 0; i < PAGE; i++) {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        b[i] = (uint8_t)x;
    }
    run("copy", OP_COPY, pb, pc, PAGE, 0, 0);
    if (memcmp(b, c, PAGE) != 0)
        fail("copy: destination differs from source");
    report("dma copy ok len=%d", PAGE);

    /* CHECKSUM: the device reads guest memory and computes CRC-32. */
    run("checksum", OP_CHECKSUM, pb, 0, PAGE, 0, 0);
    uint32_t want = crc32_ieee(b, PAGE), got = rd(REG_RESULT);
    if (got != want)
        fail("checksum: RESULT=0x%08x, want 0x%08x", got, want);
    report("dma checksum ok crc=0x%08x", got);

    ats_round(pb, pc, b, c);

    /* Interrupts through INTx and uio_pci_generic. */
    int irq = (int)read_hex_file(dev_path, "irq");
    if (irq <= 0)
        fail("device has no IRQ (irq=%d)", irq);
    uint32_t events = 0;
    irq_round(1, uio, irq, a, pa, &events);
    irq_round(2, uio, irq, a, pa, &events);
    report("irq ok rounds=2");

    report("RESULT PASS");
    return 0;
}
