//! nfcpay-loadgen (being written).
fn main() {}
