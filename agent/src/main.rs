fn main() {
    println!("{}", sluice_agent::datapath::EBPF_OBJECT.len());
}
