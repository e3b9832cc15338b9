//! One emulated PN532: its host-link decoder, its chip state (registers, parameters, RF
//! configuration), its role in the shared field, and the command it is still working on.
//!
//! Commands that only touch this chip are answered here ([`Device::run_local`]); commands that
//! reach through the RF field to another device are run by [`super::field::Field`].

use std::time::{Duration, Instant};

use super::command::{Command, JumpForDepRequest, TargetConfig, code};
use super::frame::FrameDecoder;

/// The firmware version answered to GetFirmwareVersion: PN532 (IC 0x32), version 1.6, supporting
/// ISO/IEC 14443-A, ISO/IEC 14443-B and ISO/IEC 18092 (support byte 0x07).
pub const FIRMWARE_VERSION: [u8; 4] = [0x32, 0x01, 0x06, 0x07];
/// Size of the register address space (ReadRegister/WriteRegister take 16-bit addresses).
pub const REGISTER_SPACE_BYTES: usize = 1 << 16;
/// Time one passive activation attempt (InListPassiveTarget) takes when no card answers.
pub const PASSIVE_ACTIVATION_ATTEMPT: Duration = Duration::from_millis(5);
/// Longest an initiator's InDataExchange waits for the target's TgSetData. A real PN532 target
/// keeps the initiator waiting with timeout extensions for as long as its host is busy; this
/// bound keeps a stuck target host from holding an initiator forever.
pub const TARGET_RESPONSE_WAIT_MAX: Duration = Duration::from_secs(30);
/// Retry count value meaning "retry forever" in RFConfiguration item 5.
pub const RETRY_FOREVER: u8 = 0xFF;

/// Status byte: success.
pub const STATUS_OK: u8 = 0x00;
/// Status byte: the target did not answer in time.
pub const STATUS_TIMEOUT: u8 = 0x01;
/// Status byte: DEP protocol, invalid device state.
pub const STATUS_INVALID_DEP_STATE: u8 = 0x25;
/// Status byte: command not acceptable in the current context.
pub const STATUS_NOT_ACCEPTABLE: u8 = 0x27;
/// Status byte: the target was released by the initiator.
pub const STATUS_RELEASED: u8 = 0x29;

/// Default RFConfiguration timing codes (PN532 User Manual, §7.3.1): ATR_RES 102.4 ms,
/// non-DEP retry 51.2 ms.
const ATR_RESPONSE_TIMEOUT_CODE_DEFAULT: u8 = 0x0B;
const RETRY_TIMEOUT_CODE_DEFAULT: u8 = 0x0A;
/// Largest timing code (3.28 s); larger codes are treated as this one.
const TIMEOUT_CODE_MAX: u8 = 0x10;

/// Which side of an NFC-DEP link a device is on, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// Neither initiator nor target.
    Idle,
    /// Reader/initiator.
    Initiator(InitiatorLink),
    /// Card/target.
    Target(TargetState),
}

/// An initiator's link to a DEP target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InitiatorLink {
    /// No target selected.
    None,
    /// Linked to the target on this device index.
    Dep {
        /// Device index of the target.
        target: usize,
    },
    /// The linked target left the field (released itself, or its host went away).
    Lost,
}

/// A target's state in the field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetState {
    /// TgInitAsTarget is running: waiting for an initiator's activation.
    Armed(TargetConfig),
    /// Activated by the initiator on device `initiator`.
    Activated {
        /// Device index of the initiator.
        initiator: usize,
        /// DEP data from the initiator not yet fetched by TgGetData.
        inbox: Option<Vec<u8>>,
        /// TgGetData delivered data that TgSetData has not answered yet.
        exchange_open: bool,
    },
    /// The initiator released this target or left the field.
    Released,
}

/// A command accepted (ACKed) but not answered yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pending {
    /// TgInitAsTarget waiting for activation.
    Activation,
    /// InJumpForDEP waiting for a target; `None` deadline: retry forever.
    JumpForDep {
        /// The activation parameters.
        request: JumpForDepRequest,
        /// When to give up.
        deadline: Option<Instant>,
    },
    /// InListPassiveTarget waiting for a card; `None` deadline: retry forever.
    ListPassive {
        /// BrTy.
        modulation: u8,
        /// When to give up.
        deadline: Option<Instant>,
    },
    /// InCommunicateThru waiting for an answer that will not come.
    CommunicateThru {
        /// When to give up.
        deadline: Instant,
    },
    /// InDataExchange waiting for the target's TgSetData.
    DataExchange {
        /// Device index of the target.
        target: usize,
        /// When to give up.
        deadline: Instant,
    },
    /// TgGetData waiting for the initiator's InDataExchange.
    GetData,
}

impl Pending {
    /// The command this pending answer belongs to.
    pub fn command_code(&self) -> u8 {
        match self {
            Self::Activation => code::TG_INIT_AS_TARGET,
            Self::JumpForDep { .. } => code::IN_JUMP_FOR_DEP,
            Self::ListPassive { .. } => code::IN_LIST_PASSIVE_TARGET,
            Self::CommunicateThru { .. } => code::IN_COMMUNICATE_THRU,
            Self::DataExchange { .. } => code::IN_DATA_EXCHANGE,
            Self::GetData => code::TG_GET_DATA,
        }
    }

    /// When this pending command gives up by itself, if ever.
    pub fn deadline(&self) -> Option<Instant> {
        match self {
            Self::JumpForDep { deadline, .. } | Self::ListPassive { deadline, .. } => *deadline,
            Self::CommunicateThru { deadline } | Self::DataExchange { deadline, .. } => {
                Some(*deadline)
            }
            Self::Activation | Self::GetData => None,
        }
    }
}

/// RF settings from RFConfiguration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RfSettings {
    field_on: bool,
    atr_response_timeout_code: u8,
    retry_timeout_code: u8,
    max_retries_communication: u8,
    max_retries_atr: u8,
    max_retries_passive_activation: u8,
}

impl Default for RfSettings {
    fn default() -> Self {
        Self {
            field_on: false,
            atr_response_timeout_code: ATR_RESPONSE_TIMEOUT_CODE_DEFAULT,
            retry_timeout_code: RETRY_TIMEOUT_CODE_DEFAULT,
            max_retries_communication: 0x00,
            max_retries_atr: RETRY_FOREVER,
            max_retries_passive_activation: RETRY_FOREVER,
        }
    }
}

/// The answer to a command run locally.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocalOutcome {
    /// Answer with this response data now.
    Respond(Vec<u8>),
    /// The command cannot run: answer with the syntax-error frame.
    SyntaxError,
}

/// One emulated PN532.
#[derive(Debug)]
pub struct Device {
    /// Name for logs: the slave side of the pseudo-terminal.
    pub name: String,
    /// Host-link decoder.
    pub decoder: FrameDecoder,
    /// Role in the field.
    pub role: Role,
    /// The accepted command not answered yet.
    pub pending: Option<Pending>,
    /// The last response frame, sent again on NACK.
    pub last_response: Option<Vec<u8>>,
    registers: Vec<u8>,
    parameters: u8,
    rf: RfSettings,
}

impl Device {
    /// A device in its power-on state.
    pub fn new(name: String) -> Self {
        Self {
            name,
            decoder: FrameDecoder::new(),
            role: Role::Idle,
            pending: None,
            last_response: None,
            registers: vec![0; REGISTER_SPACE_BYTES],
            parameters: 0,
            rf: RfSettings::default(),
        }
    }

    /// Back to the power-on state (the host closed the line). The field must have detached
    /// the device from its peers first.
    pub fn reset(&mut self) {
        let name = std::mem::take(&mut self.name);
        *self = Self::new(name);
    }

    /// How long InJumpForDEP looks for a target: `None` means forever.
    pub fn jump_for_dep_wait(&self) -> Option<Duration> {
        attempts_wait(
            self.rf.max_retries_atr,
            timing_code_duration(self.rf.atr_response_timeout_code),
        )
    }

    /// How long InListPassiveTarget polls for a card: `None` means forever.
    pub fn passive_activation_wait(&self) -> Option<Duration> {
        attempts_wait(
            self.rf.max_retries_passive_activation,
            PASSIVE_ACTIVATION_ATTEMPT,
        )
    }

    /// How long InCommunicateThru waits for a card's answer.
    pub fn communication_wait(&self) -> Duration {
        let attempts = u32::from(self.rf.max_retries_communication) + 1;
        timing_code_duration(self.rf.retry_timeout_code) * attempts
    }

    /// Runs a command that involves no other device. Returns `None` for commands the field
    /// must run.
    pub fn run_local(&mut self, command: &Command) -> Option<LocalOutcome> {
        let outcome = match command {
            Command::Diagnose { test, params } => self.diagnose(*test, params),
            Command::GetFirmwareVersion => LocalOutcome::Respond(FIRMWARE_VERSION.to_vec()),
            Command::GetGeneralStatus => LocalOutcome::Respond(self.general_status()),
            Command::ReadRegister { addresses } => LocalOutcome::Respond(
                addresses
                    .iter()
                    .map(|&address| self.registers[usize::from(address)])
                    .collect(),
            ),
            Command::WriteRegister { writes } => {
                for &(address, value) in writes {
                    self.registers[usize::from(address)] = value;
                }
                LocalOutcome::Respond(Vec::new())
            }
            Command::SetParameters { flags } => {
                self.parameters = *flags;
                LocalOutcome::Respond(Vec::new())
            }
            Command::SamConfiguration { .. } => LocalOutcome::Respond(Vec::new()),
            Command::PowerDown => LocalOutcome::Respond(vec![STATUS_OK]),
            Command::RfConfiguration { item, values } => self.rf_configuration(*item, values),
            Command::TgGetTargetStatus => LocalOutcome::Respond(self.target_status()),
            Command::InJumpForDep(_)
            | Command::InListPassiveTarget { .. }
            | Command::InDataExchange { .. }
            | Command::InCommunicateThru { .. }
            | Command::InDeselect { .. }
            | Command::InRelease { .. }
            | Command::TgInitAsTarget(_)
            | Command::TgGetData
            | Command::TgSetData { .. } => return None,
        };
        Some(outcome)
    }

    fn diagnose(&self, test: u8, params: &[u8]) -> LocalOutcome {
        match test {
            // Communication line test: echo NumTst and InParam.
            0x00 => {
                let mut echo = Vec::with_capacity(params.len() + 1);
                echo.push(test);
                echo.extend_from_slice(params);
                LocalOutcome::Respond(echo)
            }
            // ROM and RAM tests pass.
            0x01 | 0x02 => LocalOutcome::Respond(vec![STATUS_OK]),
            // Card presence: only a linked DEP target is ever present.
            0x06 => {
                let present = matches!(self.role, Role::Initiator(InitiatorLink::Dep { .. }));
                LocalOutcome::Respond(vec![if present { STATUS_OK } else { STATUS_TIMEOUT }])
            }
            _ => LocalOutcome::SyntaxError,
        }
    }

    fn general_status(&self) -> Vec<u8> {
        let mut status = vec![STATUS_OK, u8::from(self.rf.field_on)];
        match self.role {
            // Tg 1, BrRx/BrTx 106 kbps, modulation type DEP passive 106 kbps (0x10).
            Role::Initiator(InitiatorLink::Dep { .. }) => status.extend([1, 1, 0, 0, 0x10]),
            _ => status.push(0),
        }
        // SAM status.
        status.push(0x00);
        status
    }

    fn target_status(&self) -> Vec<u8> {
        match self.role {
            Role::Target(TargetState::Activated { .. }) => vec![0x01, 0x00],
            Role::Target(TargetState::Released) => vec![0x02, 0x00],
            _ => vec![0x00, 0x00],
        }
    }

    fn rf_configuration(&mut self, item: u8, values: &[u8]) -> LocalOutcome {
        // Command::parse checked each item's length.
        match (item, values) {
            (0x01, [field]) => self.rf.field_on = field & 0x01 != 0,
            (0x02, [_rfu, atr_response, retry]) => {
                self.rf.atr_response_timeout_code = *atr_response;
                self.rf.retry_timeout_code = *retry;
            }
            (0x04, [communication]) => self.rf.max_retries_communication = *communication,
            (0x05, [atr, _psl, passive_activation]) => {
                self.rf.max_retries_atr = *atr;
                self.rf.max_retries_passive_activation = *passive_activation;
            }
            // Analog settings: nothing to emulate.
            (0x0A..=0x0D, _) => {}
            _ => return LocalOutcome::SyntaxError,
        }
        LocalOutcome::Respond(Vec::new())
    }
}

/// RFConfiguration timing code to duration: 0 is no wait, n is 100 µs × 2^(n−1).
fn timing_code_duration(timing_code: u8) -> Duration {
    if timing_code == 0 {
        return Duration::ZERO;
    }
    let exponent = u32::from(timing_code.min(TIMEOUT_CODE_MAX) - 1);
    Duration::from_micros(100 * (1_u64 << exponent))
}

/// Total wait of `retries + 1` attempts, or `None` when the retry count means forever.
fn attempts_wait(retries: u8, per_attempt: Duration) -> Option<Duration> {
    if retries == RETRY_FOREVER {
        None
    } else {
        Some(per_attempt * (u32::from(retries) + 1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local(device: &mut Device, payload: &[u8]) -> LocalOutcome {
        let command = Command::parse(payload).unwrap();
        device.run_local(&command).unwrap()
    }

    #[test]
    fn echoes_libnfc_communication_check() {
        let mut device = Device::new("test".into());
        assert_eq!(
            local(&mut device, b"\x00\x00libnfc"),
            LocalOutcome::Respond(b"\x00libnfc".to_vec())
        );
    }

    #[test]
    fn answers_as_pn532_v1_6() {
        let mut device = Device::new("test".into());
        assert_eq!(
            local(&mut device, &[0x02]),
            LocalOutcome::Respond(vec![0x32, 0x01, 0x06, 0x07])
        );
    }

    #[test]
    fn registers_keep_written_values() {
        let mut device = Device::new("test".into());
        local(&mut device, &[0x08, 0x63, 0x02, 0x80, 0x63, 0x03, 0x81]);
        assert_eq!(
            local(&mut device, &[0x06, 0x63, 0x03, 0x63, 0x02, 0xFF, 0xFF]),
            LocalOutcome::Respond(vec![0x81, 0x80, 0x00])
        );
    }

    #[test]
    fn retry_settings_bound_the_waits() {
        let mut device = Device::new("test".into());
        assert_eq!(device.jump_for_dep_wait(), None);
        // MxRtyATR 0, MxRtyPSL 1, MxRtyPassiveActivation 2.
        local(&mut device, &[0x32, 0x05, 0x00, 0x01, 0x02]);
        assert_eq!(
            device.jump_for_dep_wait(),
            Some(Duration::from_micros(102_400))
        );
        assert_eq!(
            device.passive_activation_wait(),
            Some(PASSIVE_ACTIVATION_ATTEMPT * 3)
        );
        assert_eq!(device.communication_wait(), Duration::from_micros(51_200));
    }

    #[test]
    fn timing_codes_follow_the_manual() {
        assert_eq!(timing_code_duration(0), Duration::ZERO);
        assert_eq!(timing_code_duration(1), Duration::from_micros(100));
        assert_eq!(timing_code_duration(0x10), Duration::from_micros(3_276_800));
        assert_eq!(timing_code_duration(0xFF), Duration::from_micros(3_276_800));
    }
}
