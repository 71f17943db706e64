//! Names of class codes, as `lspci` prints them (PCI Code and ID Assignment Specification 1.9,
//! chapter 1). A sub-class without a name here gets its base class's name.

/// (base class << 8 | sub-class, name).
const SUBCLASSES: &[(u16, &str)] = &[
    (0x0000, "Non-VGA unclassified device"),
    (0x0100, "SCSI storage controller"),
    (0x0101, "IDE interface"),
    (0x0106, "SATA controller"),
    (0x0108, "Non-Volatile memory controller"),
    (0x0200, "Ethernet controller"),
    (0x0300, "VGA compatible controller"),
    (0x0401, "Multimedia audio controller"),
    (0x0403, "Audio device"),
    (0x0500, "RAM memory"),
    (0x0600, "Host bridge"),
    (0x0601, "ISA bridge"),
    (0x0604, "PCI bridge"),
    (0x0700, "Serial controller"),
    (0x0c03, "USB controller"),
    (0x0c05, "SMBus"),
];

/// (base class, name).
const BASE_CLASSES: &[(u8, &str)] = &[
    (0x00, "Unclassified device"),
    (0x01, "Mass storage controller"),
    (0x02, "Network controller"),
    (0x03, "Display controller"),
    (0x04, "Multimedia controller"),
    (0x05, "Memory controller"),
    (0x06, "Bridge"),
    (0x07, "Communication controller"),
    (0x08, "Generic system peripheral"),
    (0x09, "Input device controller"),
    (0x0c, "Serial bus controller"),
    (0xff, "Unassigned class"),
];

/// The name of a 24-bit class code (base class, sub-class, programming interface).
pub fn class_name(class: u32) -> &'static str {
    let sub = (class >> 8) as u16;
    let base = (class >> 16) as u8;
    SUBCLASSES
        .iter()
        .find(|(c, _)| *c == sub)
        .map(|(_, n)| *n)
        .or_else(|| {
            BASE_CLASSES
                .iter()
                .find(|(c, _)| *c == base)
                .map(|(_, n)| *n)
        })
        .unwrap_or("Unknown class")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(class_name(0x060400), "PCI bridge");
        assert_eq!(class_name(0x010802), "Non-Volatile memory controller");
        assert_eq!(class_name(0x00ff00), "Unclassified device");
        assert_eq!(class_name(0x0d1100), "Unknown class");
    }
}
