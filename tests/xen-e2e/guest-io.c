/*
 * guest-io: port I/O the Xen end-to-end test's Linux guest needs and busybox cannot do.
 * Built static on the host (build-guest-initramfs.sh), run by the guest's /init as root.
 *
 *   guest-io ide-read SECTORS   reads the first SECTORS sectors of the primary IDE master
 *                               with ATA PIO (READ SECTORS, 28-bit LBA) and writes them to
 *                               stdout. Each sector's 256 words come in with one `rep insw`:
 *                               Xen turns it into an ioreq whose data is a guest buffer
 *                               (data_is_ptr), which only the device model that maps guest
 *                               memory (QEMU) can complete.
 *   guest-io cfc-time N         reads 00:00.0's vendor/device dword through CF8/CFC N times
 *                               and prints "cfc-time N reads VALUE avg NS ns"; the ratio
 *                               between two runs is the cost of the multiplexer's hop.
 *
 * Register facts: ATA/ATAPI-6 (T13/1410D) sections 7.x and 8.27 (READ SECTORS, 0x20); the
 * legacy primary channel's command block at 0x1f0-0x1f7 (PCI IDE Controller Specification,
 * compatibility mode). CF8/CFC: PCI Local Bus Specification 3.0, section 3.2.2.3.2.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/io.h>
#include <time.h>
#include <unistd.h>

/* Primary channel command block registers (compatibility mode). */
#define ATA_DATA 0x1f0
#define ATA_SECTOR_COUNT 0x1f2
#define ATA_LBA_LOW 0x1f3
#define ATA_LBA_MID 0x1f4
#define ATA_LBA_HIGH 0x1f5
#define ATA_DEVICE 0x1f6
#define ATA_STATUS_COMMAND 0x1f7
#define ATA_DEVICE_LBA 0x40       /* device register bit 6: LBA addressing */
#define ATA_DEVICE_OBSOLETE 0xa0  /* bits 7 and 5, set by convention */
#define ATA_STATUS_BSY 0x80
#define ATA_STATUS_DRQ 0x08
#define ATA_STATUS_ERR 0x01
#define ATA_CMD_READ_SECTORS 0x20
#define SECTOR 512

#define PCI_CONFIG_ADDRESS 0xcf8
#define PCI_CONFIG_DATA 0xcfc
#define PCI_CONFIG_ENABLE 0x80000000u

static int ata_wait_drq(void)
{
    for (long i = 0; i < 100000000L; i++) {
        uint8_t st = inb(ATA_STATUS_COMMAND);
        if (st & ATA_STATUS_BSY)
            continue;
        if (st & ATA_STATUS_ERR)
            return -1;
        if (st & ATA_STATUS_DRQ)
            return 0;
    }
    return -2;
}

static int ide_read(long sectors)
{
    static uint16_t buf[SECTOR / 2];
    for (long lba = 0; lba < sectors; lba++) {
        outb(ATA_DEVICE_OBSOLETE | ATA_DEVICE_LBA | ((lba >> 24) & 0x0f), ATA_DEVICE);
        outb(1, ATA_SECTOR_COUNT);
        outb(lba & 0xff, ATA_LBA_LOW);
        outb((lba >> 8) & 0xff, ATA_LBA_MID);
        outb((lba >> 16) & 0xff, ATA_LBA_HIGH);
        outb(ATA_CMD_READ_SECTORS, ATA_STATUS_COMMAND);
        int r = ata_wait_drq();
        if (r) {
            fprintf(stderr, "guest-io: sector %ld: %s (status %#x)\n", lba,
                    r == -1 ? "device error" : "timeout", inb(ATA_STATUS_COMMAND));
            return 1;
        }
        insw(ATA_DATA, buf, SECTOR / 2); /* rep insw */
        if (fwrite(buf, 1, sizeof buf, stdout) != sizeof buf)
            return 1;
    }
    return fflush(stdout) != 0;
}

static int cfc_time(long n)
{
    struct timespec a, b;
    uint32_t v = 0;
    outl(PCI_CONFIG_ENABLE, PCI_CONFIG_ADDRESS); /* 00:00.0, register 0 */
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (long i = 0; i < n; i++)
        v = inl(PCI_CONFIG_DATA);
    clock_gettime(CLOCK_MONOTONIC, &b);
    double ns = (b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec);
    printf("cfc-time %ld reads %08x avg %.0f ns\n", n, v, ns / (double)n);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: guest-io ide-read SECTORS | cfc-time N\n");
        return 2;
    }
    long n = strtol(argv[2], NULL, 0);
    if (n <= 0) {
        fprintf(stderr, "guest-io: '%s' is not a positive count\n", argv[2]);
        return 2;
    }
    if (iopl(3) != 0) {
        perror("guest-io: iopl");
        return 1;
    }
    if (!strcmp(argv[1], "ide-read"))
        return ide_read(n);
    if (!strcmp(argv[1], "cfc-time"))
        return cfc_time(n);
    fprintf(stderr, "guest-io: unknown command '%s'\n", argv[1]);
    return 2;
}
