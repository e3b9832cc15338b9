//! Wire formats and AES DUKPT arithmetic.
#![forbid(unsafe_code)]
