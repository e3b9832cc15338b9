//! PN532 host commands: their codes, and [`Command::parse`], which turns the payload of a host
//! information frame into a typed command or a [`CommandError`] (answered with the PN532's
//! syntax-error frame).
//!
//! Only the commands that libnfc 1.8's `pn532_uart` driver and `chips/pn53x.c` send in the flows
//! this emulator supports are parsed; any other code is [`CommandError::Unsupported`].

use thiserror::Error;

/// Command codes (PN532 User Manual, §7). A response carries the command code plus one.
pub mod code {
    /// Self-tests; test 0x00 echoes its parameters.
    pub const DIAGNOSE: u8 = 0x00;
    /// IC, version, revision and supported protocols.
    pub const GET_FIRMWARE_VERSION: u8 = 0x02;
    /// Field, targets and SAM status.
    pub const GET_GENERAL_STATUS: u8 = 0x04;
    /// Reads one or more registers.
    pub const READ_REGISTER: u8 = 0x06;
    /// Writes one or more registers.
    pub const WRITE_REGISTER: u8 = 0x08;
    /// Sets the internal parameter flags.
    pub const SET_PARAMETERS: u8 = 0x12;
    /// Configures the security access module path; also takes the chip out of Low VBat.
    pub const SAM_CONFIGURATION: u8 = 0x14;
    /// Enters power-down.
    pub const POWER_DOWN: u8 = 0x16;
    /// RF field, timings, retries and analog settings.
    pub const RF_CONFIGURATION: u8 = 0x32;
    /// Initiator: exchanges data with the selected target.
    pub const IN_DATA_EXCHANGE: u8 = 0x40;
    /// Initiator: sends raw bytes to a passive target.
    pub const IN_COMMUNICATE_THRU: u8 = 0x42;
    /// Initiator: deselects the target.
    pub const IN_DESELECT: u8 = 0x44;
    /// Initiator: polls for passive targets.
    pub const IN_LIST_PASSIVE_TARGET: u8 = 0x4A;
    /// Initiator: releases the target.
    pub const IN_RELEASE: u8 = 0x52;
    /// Initiator: activates an NFC-DEP target (ATR_REQ/ATR_RES).
    pub const IN_JUMP_FOR_DEP: u8 = 0x56;
    /// Target: waits for activation by an initiator.
    pub const TG_INIT_AS_TARGET: u8 = 0x8C;
    /// Target: receives the initiator's next DEP data.
    pub const TG_GET_DATA: u8 = 0x86;
    /// Target: reports the target state.
    pub const TG_GET_TARGET_STATUS: u8 = 0x8A;
    /// Target: answers the initiator's DEP data.
    pub const TG_SET_DATA: u8 = 0x8E;
}

/// Length of an NFCID3 (ISO/IEC 18092).
pub const NFCID3_BYTES: usize = 10;
/// Largest general-bytes field an initiator may send in InJumpForDEP.
pub const INITIATOR_GENERAL_BYTES_MAX: usize = 48;
/// Largest general-bytes field a target may give in TgInitAsTarget.
pub const TARGET_GENERAL_BYTES_MAX: usize = 47;
/// Largest historical-bytes field a target may give in TgInitAsTarget.
pub const HISTORICAL_BYTES_MAX: usize = 48;
/// Largest DEP data in one InDataExchange or TgSetData (PN532 User Manual: 262 bytes).
pub const DEP_DATA_BYTES_MAX: usize = 262;
/// Largest number of registers in one ReadRegister or WriteRegister.
pub const REGISTERS_PER_COMMAND_MAX: usize = 131;

/// Mode bit of TgInitAsTarget: accept passive activation only.
pub const TARGET_MODE_PASSIVE_ONLY: u8 = 0x01;
/// Mode bit of TgInitAsTarget: accept DEP activation only.
pub const TARGET_MODE_DEP_ONLY: u8 = 0x02;
/// Mode bit of TgInitAsTarget: ISO/IEC 14443-4 PICC emulation only.
pub const TARGET_MODE_PICC_ONLY: u8 = 0x04;

/// A payload that is not a command this emulator can run.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum CommandError {
    /// The information frame held no command code.
    #[error("empty command")]
    Empty,
    /// The command code is not one this emulator implements.
    #[error("unsupported command {0:#04x}")]
    Unsupported(u8),
    /// The parameters do not fit the command.
    #[error("malformed command {code:#04x}: {reason}")]
    Malformed {
        /// The command code.
        code: u8,
        /// What is wrong.
        reason: &'static str,
    },
}

/// Baud rate of an NFC-DEP activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DepBaudRate {
    /// 106 kbps.
    Kbps106,
    /// 212 kbps.
    Kbps212,
    /// 424 kbps.
    Kbps424,
}

impl DepBaudRate {
    /// The rate as the two-bit number used in PN532 mode bytes (0, 1, 2).
    pub fn index(self) -> u8 {
        match self {
            Self::Kbps106 => 0,
            Self::Kbps212 => 1,
            Self::Kbps424 => 2,
        }
    }
}

/// Parameters of InJumpForDEP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JumpForDepRequest {
    /// Active (true) or passive (false) communication mode.
    pub active: bool,
    /// Baud rate of the activation.
    pub baud_rate: DepBaudRate,
    /// NFCID1 (106 kbps) or polling payload (212/424 kbps), if given.
    pub passive_initiator_data: Option<Vec<u8>>,
    /// The initiator's NFCID3, if given (the PN532 makes one up otherwise).
    pub nfcid3: Option<[u8; NFCID3_BYTES]>,
    /// The initiator's general bytes.
    pub general_bytes: Vec<u8>,
}

/// Parameters of TgInitAsTarget.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetConfig {
    /// Mode bits: [`TARGET_MODE_PASSIVE_ONLY`], [`TARGET_MODE_DEP_ONLY`],
    /// [`TARGET_MODE_PICC_ONLY`].
    pub mode: u8,
    /// SENS_RES (2), NFCID1t (3; the PN532 puts 0x08 before them), SEL_RES (1).
    pub mifare: [u8; 6],
    /// NFCID2t (8), PAD (8), system code (2).
    pub felica: [u8; 18],
    /// The target's NFCID3.
    pub nfcid3: [u8; NFCID3_BYTES],
    /// The target's general bytes (answered in ATR_RES).
    pub general_bytes: Vec<u8>,
    /// Historical bytes for ISO/IEC 14443-4 emulation.
    pub historical_bytes: Vec<u8>,
}

/// A parsed host command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Diagnose: the test number and its parameters.
    Diagnose {
        /// NumTst.
        test: u8,
        /// InParam.
        params: Vec<u8>,
    },
    /// GetFirmwareVersion.
    GetFirmwareVersion,
    /// GetGeneralStatus.
    GetGeneralStatus,
    /// ReadRegister of each address.
    ReadRegister {
        /// Register addresses, in order.
        addresses: Vec<u16>,
    },
    /// WriteRegister of each (address, value).
    WriteRegister {
        /// Register writes, in order.
        writes: Vec<(u16, u8)>,
    },
    /// SetParameters.
    SetParameters {
        /// The parameter flags.
        flags: u8,
    },
    /// SAMConfiguration.
    SamConfiguration {
        /// 1 normal, 2 virtual card, 3 wired card, 4 dual card.
        mode: u8,
    },
    /// PowerDown.
    PowerDown,
    /// RFConfiguration of one item.
    RfConfiguration {
        /// CfgItem.
        item: u8,
        /// ConfigurationData; its length was checked against the item.
        values: Vec<u8>,
    },
    /// InJumpForDEP.
    InJumpForDep(JumpForDepRequest),
    /// InListPassiveTarget.
    InListPassiveTarget {
        /// MaxTg (1 or 2).
        max_targets: u8,
        /// BrTy: 0 is ISO/IEC 14443-A at 106 kbps.
        modulation: u8,
    },
    /// InDataExchange.
    InDataExchange {
        /// Tg (the logical target number).
        target: u8,
        /// DataOut.
        data: Vec<u8>,
    },
    /// InCommunicateThru.
    InCommunicateThru {
        /// DataOut.
        data: Vec<u8>,
    },
    /// InDeselect (target 0: all).
    InDeselect {
        /// Tg.
        target: u8,
    },
    /// InRelease (target 0: all).
    InRelease {
        /// Tg.
        target: u8,
    },
    /// TgInitAsTarget.
    TgInitAsTarget(TargetConfig),
    /// TgGetData.
    TgGetData,
    /// TgSetData.
    TgSetData {
        /// DataOut.
        data: Vec<u8>,
    },
    /// TgGetTargetStatus.
    TgGetTargetStatus,
}

impl Command {
    /// The command code this command was parsed from.
    pub fn code(&self) -> u8 {
        match self {
            Self::Diagnose { .. } => code::DIAGNOSE,
            Self::GetFirmwareVersion => code::GET_FIRMWARE_VERSION,
            Self::GetGeneralStatus => code::GET_GENERAL_STATUS,
            Self::ReadRegister { .. } => code::READ_REGISTER,
            Self::WriteRegister { .. } => code::WRITE_REGISTER,
            Self::SetParameters { .. } => code::SET_PARAMETERS,
            Self::SamConfiguration { .. } => code::SAM_CONFIGURATION,
            Self::PowerDown => code::POWER_DOWN,
            Self::RfConfiguration { .. } => code::RF_CONFIGURATION,
            Self::InJumpForDep(_) => code::IN_JUMP_FOR_DEP,
            Self::InListPassiveTarget { .. } => code::IN_LIST_PASSIVE_TARGET,
            Self::InDataExchange { .. } => code::IN_DATA_EXCHANGE,
            Self::InCommunicateThru { .. } => code::IN_COMMUNICATE_THRU,
            Self::InDeselect { .. } => code::IN_DESELECT,
            Self::InRelease { .. } => code::IN_RELEASE,
            Self::TgInitAsTarget(_) => code::TG_INIT_AS_TARGET,
            Self::TgGetData => code::TG_GET_DATA,
            Self::TgSetData { .. } => code::TG_SET_DATA,
            Self::TgGetTargetStatus => code::TG_GET_TARGET_STATUS,
        }
    }

    /// Parses `payload` (`PD0 … PDn` of a host information frame).
    pub fn parse(payload: &[u8]) -> Result<Self, CommandError> {
        let (&command_code, params) = payload.split_first().ok_or(CommandError::Empty)?;
        let malformed = |reason| CommandError::Malformed {
            code: command_code,
            reason,
        };
        let no_params = |command: Command| {
            if params.is_empty() {
                Ok(command)
            } else {
                Err(malformed("takes no parameters"))
            }
        };
        match command_code {
            code::DIAGNOSE => {
                let (&test, rest) = params.split_first().ok_or(malformed("no test number"))?;
                Ok(Self::Diagnose {
                    test,
                    params: rest.to_vec(),
                })
            }
            code::GET_FIRMWARE_VERSION => no_params(Self::GetFirmwareVersion),
            code::GET_GENERAL_STATUS => no_params(Self::GetGeneralStatus),
            code::READ_REGISTER => {
                if params.is_empty() || params.len() % 2 != 0 {
                    return Err(malformed("addresses are two bytes each"));
                }
                if params.len() / 2 > REGISTERS_PER_COMMAND_MAX {
                    return Err(malformed("too many registers"));
                }
                let addresses = params
                    .chunks_exact(2)
                    .map(|pair| u16::from_be_bytes([pair[0], pair[1]]))
                    .collect();
                Ok(Self::ReadRegister { addresses })
            }
            code::WRITE_REGISTER => {
                if params.is_empty() || params.len() % 3 != 0 {
                    return Err(malformed("writes are three bytes each"));
                }
                if params.len() / 3 > REGISTERS_PER_COMMAND_MAX {
                    return Err(malformed("too many registers"));
                }
                let writes = params
                    .chunks_exact(3)
                    .map(|triple| (u16::from_be_bytes([triple[0], triple[1]]), triple[2]))
                    .collect();
                Ok(Self::WriteRegister { writes })
            }
            code::SET_PARAMETERS => match params {
                [flags] => Ok(Self::SetParameters { flags: *flags }),
                _ => Err(malformed("takes one flags byte")),
            },
            code::SAM_CONFIGURATION => match params {
                [mode, ..] if params.len() <= 3 && (1..=4).contains(mode) => {
                    Ok(Self::SamConfiguration { mode: *mode })
                }
                _ => Err(malformed("mode 1..=4, optional timeout and IRQ")),
            },
            code::POWER_DOWN => match params.len() {
                1 | 2 => Ok(Self::PowerDown),
                _ => Err(malformed("WakeUpEnable and optional GenerateIRQ")),
            },
            code::RF_CONFIGURATION => parse_rf_configuration(params).map_err(malformed),
            code::IN_JUMP_FOR_DEP => parse_jump_for_dep(params)
                .map(Self::InJumpForDep)
                .map_err(malformed),
            code::IN_LIST_PASSIVE_TARGET => match params {
                [max_targets @ 1..=2, modulation, ..] => Ok(Self::InListPassiveTarget {
                    max_targets: *max_targets,
                    modulation: *modulation,
                }),
                _ => Err(malformed("MaxTg 1..=2 and BrTy")),
            },
            code::IN_DATA_EXCHANGE => {
                let (&target, data) = params.split_first().ok_or(malformed("no target"))?;
                if data.len() > DEP_DATA_BYTES_MAX {
                    return Err(malformed("data too long"));
                }
                Ok(Self::InDataExchange {
                    target,
                    data: data.to_vec(),
                })
            }
            code::IN_COMMUNICATE_THRU => Ok(Self::InCommunicateThru {
                data: params.to_vec(),
            }),
            code::IN_DESELECT => match params {
                [target] => Ok(Self::InDeselect { target: *target }),
                _ => Err(malformed("takes one target number")),
            },
            code::IN_RELEASE => match params {
                [target] => Ok(Self::InRelease { target: *target }),
                _ => Err(malformed("takes one target number")),
            },
            code::TG_INIT_AS_TARGET => parse_target_config(params)
                .map(Self::TgInitAsTarget)
                .map_err(malformed),
            code::TG_GET_DATA => no_params(Self::TgGetData),
            code::TG_SET_DATA => {
                if params.len() > DEP_DATA_BYTES_MAX {
                    return Err(malformed("data too long"));
                }
                Ok(Self::TgSetData {
                    data: params.to_vec(),
                })
            }
            code::TG_GET_TARGET_STATUS => no_params(Self::TgGetTargetStatus),
            other => Err(CommandError::Unsupported(other)),
        }
    }
}

/// RFConfiguration: CfgItem followed by the number of bytes that item takes.
fn parse_rf_configuration(params: &[u8]) -> Result<Command, &'static str> {
    let (&item, values) = params.split_first().ok_or("no configuration item")?;
    let expected = match item {
        0x01 | 0x04 => 1,
        0x02 | 0x05 | 0x0C => 3,
        0x0A => 11,
        0x0B => 8,
        0x0D => 9,
        _ => return Err("unknown configuration item"),
    };
    if values.len() != expected {
        return Err("wrong length for configuration item");
    }
    Ok(Command::RfConfiguration {
        item,
        values: values.to_vec(),
    })
}

/// InJumpForDEP: ActPass, BR, Next, then the optional fields Next announces.
fn parse_jump_for_dep(params: &[u8]) -> Result<JumpForDepRequest, &'static str> {
    let [act_pass, baud_rate, next, rest @ ..] = params else {
        return Err("ActPass, BR and Next are required");
    };
    let active = match act_pass {
        0x00 => false,
        0x01 => true,
        _ => return Err("ActPass must be 0 or 1"),
    };
    let baud_rate = match baud_rate {
        0x00 => DepBaudRate::Kbps106,
        0x01 => DepBaudRate::Kbps212,
        0x02 => DepBaudRate::Kbps424,
        _ => return Err("BR must be 0, 1 or 2"),
    };
    if next & !0x07 != 0 {
        return Err("unknown bits in Next");
    }
    let mut rest = rest;
    let passive_initiator_data = if next & 0x01 != 0 {
        let len = if baud_rate == DepBaudRate::Kbps106 {
            4
        } else {
            5
        };
        Some(split_field(&mut rest, len)?.to_vec())
    } else {
        None
    };
    let nfcid3 = if next & 0x02 != 0 {
        let mut nfcid3 = [0; NFCID3_BYTES];
        nfcid3.copy_from_slice(split_field(&mut rest, NFCID3_BYTES)?);
        Some(nfcid3)
    } else {
        None
    };
    let general_bytes = if next & 0x04 != 0 {
        if rest.len() > INITIATOR_GENERAL_BYTES_MAX {
            return Err("too many general bytes");
        }
        std::mem::take(&mut rest).to_vec()
    } else {
        Vec::new()
    };
    if !rest.is_empty() {
        return Err("bytes after the announced fields");
    }
    Ok(JumpForDepRequest {
        active,
        baud_rate,
        passive_initiator_data,
        nfcid3,
        general_bytes,
    })
}

/// Splits the first `len` bytes off `rest`.
fn split_field<'a>(rest: &mut &'a [u8], len: usize) -> Result<&'a [u8], &'static str> {
    if rest.len() < len {
        return Err("shorter than Next announces");
    }
    let (field, tail) = rest.split_at(len);
    *rest = tail;
    Ok(field)
}

/// TgInitAsTarget: Mode, MifareParams (6), FeliCaParams (18), NFCID3t (10), LEN Gt, Gt,
/// LEN Tk, Tk.
fn parse_target_config(params: &[u8]) -> Result<TargetConfig, &'static str> {
    const FIXED_BYTES: usize = 1 + 6 + 18 + NFCID3_BYTES;
    if params.len() < FIXED_BYTES + 2 {
        return Err("shorter than the fixed fields");
    }
    let (fixed, rest) = params.split_at(FIXED_BYTES);
    let mode = fixed[0];
    if mode & !(TARGET_MODE_PASSIVE_ONLY | TARGET_MODE_DEP_ONLY | TARGET_MODE_PICC_ONLY) != 0 {
        return Err("unknown mode bits");
    }
    let mut mifare = [0; 6];
    mifare.copy_from_slice(&fixed[1..7]);
    let mut felica = [0; 18];
    felica.copy_from_slice(&fixed[7..25]);
    let mut nfcid3 = [0; NFCID3_BYTES];
    nfcid3.copy_from_slice(&fixed[25..FIXED_BYTES]);

    let (&general_len, rest) = rest.split_first().ok_or("no general-bytes length")?;
    let general_len = usize::from(general_len);
    if general_len > TARGET_GENERAL_BYTES_MAX || rest.len() < general_len + 1 {
        return Err("bad general-bytes length");
    }
    let (general_bytes, rest) = rest.split_at(general_len);
    let (&historical_len, historical_bytes) =
        rest.split_first().ok_or("no historical-bytes length")?;
    let historical_len = usize::from(historical_len);
    if historical_len > HISTORICAL_BYTES_MAX || historical_bytes.len() != historical_len {
        return Err("bad historical-bytes length");
    }
    Ok(TargetConfig {
        mode,
        mifare,
        felica,
        nfcid3,
        general_bytes: general_bytes.to_vec(),
        historical_bytes: historical_bytes.to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_libnfc_communication_check() {
        let command = Command::parse(b"\x00\x00libnfc").unwrap();
        assert_eq!(
            command,
            Command::Diagnose {
                test: 0,
                params: b"libnfc".to_vec()
            }
        );
    }

    #[test]
    fn parses_jump_for_dep_as_nfc_dep_initiator_sends_it() {
        // Passive, 212 kbps, passive initiator data only.
        let command =
            Command::parse(&[0x56, 0x00, 0x01, 0x01, 0x00, 0xFF, 0xFF, 0x00, 0x0F]).unwrap();
        assert_eq!(
            command,
            Command::InJumpForDep(JumpForDepRequest {
                active: false,
                baud_rate: DepBaudRate::Kbps212,
                passive_initiator_data: Some(vec![0x00, 0xFF, 0xFF, 0x00, 0x0F]),
                nfcid3: None,
                general_bytes: Vec::new(),
            })
        );
    }

    #[test]
    fn refuses_jump_for_dep_shorter_than_announced() {
        let error = Command::parse(&[0x56, 0x00, 0x00, 0x02, 0x01, 0x02]).unwrap_err();
        assert!(matches!(error, CommandError::Malformed { code: 0x56, .. }));
    }

    #[test]
    fn parses_target_config_with_general_bytes() {
        let mut payload = vec![0x8C, TARGET_MODE_DEP_ONLY];
        payload.extend([0x08, 0x00, 0x12, 0x34, 0x56, 0x40]);
        payload.extend([0xAA; 18]);
        payload.extend([0x12, 0x34, 0x56, 0x78, 0x9A, 0xBC, 0xDE, 0xFF, 0x00, 0x00]);
        payload.extend([4, 0x12, 0x34, 0x56, 0x78, 0]);
        let Command::TgInitAsTarget(config) = Command::parse(&payload).unwrap() else {
            panic!("not TgInitAsTarget");
        };
        assert_eq!(config.mode, TARGET_MODE_DEP_ONLY);
        assert_eq!(config.general_bytes, [0x12, 0x34, 0x56, 0x78]);
        assert!(config.historical_bytes.is_empty());
    }

    #[test]
    fn refuses_target_config_with_lying_lengths() {
        let mut payload = vec![0x8C, TARGET_MODE_DEP_ONLY];
        payload.extend([0; 6 + 18 + 10]);
        payload.extend([40, 1, 2]);
        assert!(matches!(
            Command::parse(&payload),
            Err(CommandError::Malformed { code: 0x8C, .. })
        ));
    }

    #[test]
    fn parses_register_access() {
        assert_eq!(
            Command::parse(&[0x06, 0x63, 0x02, 0x63, 0x03]).unwrap(),
            Command::ReadRegister {
                addresses: vec![0x6302, 0x6303]
            }
        );
        assert_eq!(
            Command::parse(&[0x08, 0x63, 0x3D, 0x00]).unwrap(),
            Command::WriteRegister {
                writes: vec![(0x633D, 0x00)]
            }
        );
        assert!(Command::parse(&[0x06, 0x63]).is_err());
    }

    #[test]
    fn reports_unknown_and_empty_commands() {
        assert_eq!(Command::parse(&[]), Err(CommandError::Empty));
        assert_eq!(
            Command::parse(&[0x60, 1, 2]),
            Err(CommandError::Unsupported(0x60))
        );
    }

    #[test]
    fn refuses_oversized_dep_data() {
        let mut payload = vec![0x40, 0x01];
        payload.extend(vec![0; DEP_DATA_BYTES_MAX + 1]);
        assert!(Command::parse(&payload).is_err());
    }
}
