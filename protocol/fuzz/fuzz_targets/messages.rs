//! Fuzzes every message decoder of `nfcpay_protocol::messages` with the same input: none may
//! panic, and whatever one accepts must re-encode to exactly the input (the encodings are
//! canonical).
#![no_main]

use libfuzzer_sys::fuzz_target;
use nfcpay_protocol::messages::{
    HalfEnvelope, PaymentInstruction, PaymentRequest, Receipt, SealedReceipt,
};

fuzz_target!(|data: &[u8]| {
    if let Ok(request) = PaymentRequest::decode(data) {
        assert_eq!(request.encode(), data);
    }
    if let Ok(instruction) = PaymentInstruction::decode(data) {
        assert_eq!(instruction.encode(), data);
    }
    if let Ok(half) = HalfEnvelope::decode(data) {
        assert_eq!(half.encode(), data);
        assert_eq!(half.header_bytes(), &data[..half.header_bytes().len()]);
        assert_eq!(
            half.header().encode(half.body().len()).ok().as_deref(),
            Some(half.header_bytes())
        );
    }
    if let Ok(receipt) = Receipt::decode(data) {
        assert_eq!(receipt.encode(), data);
    }
    if let Ok(sealed) = SealedReceipt::decode(data) {
        assert_eq!(sealed.encode(), data);
        assert_eq!(sealed.receipt().encode(), sealed.body_bytes());
    }
});
