#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    ioreq_mux_fuzz::pcie_port::run(data);
});
