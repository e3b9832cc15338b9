//! The shared virtual RF field: every emulated PN532 sits in it, so an initiator on one device
//! activates (InJumpForDEP) and talks to (InDataExchange) a target armed on another
//! (TgInitAsTarget, TgGetData, TgSetData).
//!
//! [`Field`] is pure state: it takes bytes from a host line, hang-ups and the passing of time,
//! and gives back the bytes to write to each host line. It does no I/O, so tests drive it with
//! in-memory links; [`super::Simulator`] connects it to pseudo-terminals.
//!
//! The NFC-DEP exchange follows the chip: the initiator's InDataExchange data is what the
//! target's TgGetData returns, and the target's TgSetData data is what the initiator's
//! InDataExchange returns. A target that leaves (its host releases it, re-arms, or closes the
//! line) turns a waiting InDataExchange into status 0x01 (timeout); an initiator that releases
//! or leaves turns a waiting TgGetData into status 0x29 (released).

use std::time::Instant;

use tracing::{debug, info, warn};

use super::command::{
    Command, DepBaudRate, JumpForDepRequest, NFCID3_BYTES, TARGET_MODE_PASSIVE_ONLY,
    TARGET_MODE_PICC_ONLY, TargetConfig, code,
};
use super::device::{
    Device, InitiatorLink, LocalOutcome, Pending, Role, STATUS_INVALID_DEP_STATE,
    STATUS_NOT_ACCEPTABLE, STATUS_OK, STATUS_RELEASED, STATUS_TIMEOUT, TARGET_RESPONSE_WAIT_MAX,
    TargetState,
};
use super::frame::{ACK_FRAME, ERROR_FRAME, Frame, TFI_HOST_TO_PN532, encode_response};

/// DEP timeout value (TO) a target announces in ATR_RES.
const ATR_RESPONSE_TIMEOUT_VALUE: u8 = 0x0E;
/// PPt/PPi: maximum payload 254 bytes (LR = 3).
const PROTOCOL_PARAMETERS_LR_254: u8 = 0x30;
/// PPt/PPi: general bytes present.
const PROTOCOL_PARAMETERS_GENERAL_BYTES: u8 = 0x02;
/// First bytes of the NFCID3 a device makes up when the initiator gives none.
const NFCID3_PREFIX: [u8; 6] = [0x01, 0xFE, 0x50, 0x4E, 0x35, 0x32];
/// BrTy of InListPassiveTarget for ISO/IEC 14443-A at 106 kbps.
const MODULATION_ISO14443A_106: u8 = 0x00;
/// The byte a PN532 target puts before its three NFCID1 bytes.
const NFCID1_FIRST_BYTE: u8 = 0x08;

/// Bytes to write to one device's host line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    /// Device index.
    pub device: usize,
    /// Bytes to write.
    pub bytes: Vec<u8>,
}

/// All emulated devices and the links between them.
#[derive(Debug)]
pub struct Field {
    devices: Vec<Device>,
    outbox: Vec<Output>,
}

impl Field {
    /// A field with one device per name, all idle.
    pub fn new(names: Vec<String>) -> Self {
        Self {
            devices: names.into_iter().map(Device::new).collect(),
            outbox: Vec::new(),
        }
    }

    /// Number of devices.
    pub fn device_count(&self) -> usize {
        self.devices.len()
    }

    /// Handles bytes the host wrote on device `device`'s line.
    pub fn receive(&mut self, device: usize, bytes: &[u8], now: Instant) -> Vec<Output> {
        let Some(slot) = self.devices.get_mut(device) else {
            warn!(device, "bytes for an unknown device");
            return Vec::new();
        };
        for frame in slot.decoder.feed(bytes) {
            match frame {
                Ok(frame) => self.on_frame(device, frame, now),
                Err(error) => debug!(device, %error, "frame dropped"),
            }
        }
        self.settle();
        std::mem::take(&mut self.outbox)
    }

    /// Handles the host closing device `device`'s line: the device leaves the field and
    /// returns to its power-on state.
    pub fn hang_up(&mut self, device: usize) -> Vec<Output> {
        if device >= self.devices.len() {
            return Vec::new();
        }
        let slot = &self.devices[device];
        if slot.last_response.is_some() || slot.role != Role::Idle {
            info!(device, pty = ?slot.name, "host line closed");
        } else {
            debug!(device, pty = ?slot.name, "line closed before any command");
        }
        self.devices[device].pending = None;
        self.detach(device);
        self.devices[device].reset();
        self.settle();
        std::mem::take(&mut self.outbox)
    }

    /// Answers every pending command whose deadline is at or before `now`.
    pub fn expire(&mut self, now: Instant) -> Vec<Output> {
        for device in 0..self.devices.len() {
            let expired = self.devices[device]
                .pending
                .as_ref()
                .and_then(Pending::deadline)
                .is_some_and(|deadline| deadline <= now);
            if !expired {
                continue;
            }
            let Some(pending) = self.devices[device].pending.take() else {
                continue;
            };
            let status = match pending {
                Pending::ListPassive { .. } => {
                    // NbTg = 0: no card answered.
                    0x00
                }
                Pending::JumpForDep { .. } => {
                    debug!(device, "no DEP target answered");
                    STATUS_TIMEOUT
                }
                Pending::DataExchange { target, .. } => {
                    warn!(device, target, "target did not answer in time");
                    STATUS_TIMEOUT
                }
                Pending::CommunicateThru { .. } | Pending::Activation | Pending::GetData => {
                    STATUS_TIMEOUT
                }
            };
            self.respond(device, pending.command_code(), &[status]);
        }
        std::mem::take(&mut self.outbox)
    }

    /// The earliest deadline of any pending command.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.devices
            .iter()
            .filter_map(|device| device.pending.as_ref().and_then(Pending::deadline))
            .min()
    }

    /// The role of device `device`, for tests and logs.
    pub fn role(&self, device: usize) -> Option<&Role> {
        self.devices.get(device).map(|device| &device.role)
    }

    fn on_frame(&mut self, device: usize, frame: Frame, now: Instant) {
        match frame {
            Frame::Ack => {
                if let Some(pending) = self.devices[device].pending.take() {
                    debug!(
                        device,
                        code = pending.command_code(),
                        "command aborted by host"
                    );
                    self.abandon(device, pending);
                }
            }
            Frame::Nack => {
                if let Some(response) = self.devices[device].last_response.clone() {
                    self.push(device, response);
                }
            }
            Frame::Information(information) if information.tfi == TFI_HOST_TO_PN532 => {
                // A new command ends the one still running, as a real PN532 does.
                if let Some(pending) = self.devices[device].pending.take() {
                    debug!(device, code = pending.command_code(), "command superseded");
                    self.abandon(device, pending);
                }
                self.push(device, ACK_FRAME.to_vec());
                match Command::parse(&information.payload) {
                    Ok(command) => self.run(device, command, now),
                    Err(error) => {
                        debug!(device, %error, "syntax error");
                        self.push_error_frame(device);
                    }
                }
            }
            Frame::Information(information) => {
                debug!(
                    device,
                    tfi = information.tfi,
                    "frame not addressed to a PN532"
                );
            }
        }
    }

    /// Undoes what a pending command left behind when it ends without an answer.
    fn abandon(&mut self, device: usize, pending: Pending) {
        if pending == Pending::Activation
            && matches!(
                self.devices[device].role,
                Role::Target(TargetState::Armed(_))
            )
        {
            self.devices[device].role = Role::Idle;
        }
    }

    fn run(&mut self, device: usize, command: Command, now: Instant) {
        let code = command.code();
        debug!(device, code, "command");
        if let Some(outcome) = self.devices[device].run_local(&command) {
            match outcome {
                LocalOutcome::Respond(data) => self.respond(device, code, &data),
                LocalOutcome::SyntaxError => self.push_error_frame(device),
            }
            return;
        }
        match command {
            Command::InJumpForDep(request) => self.jump_for_dep(device, request, now),
            Command::InListPassiveTarget { modulation, .. } => {
                self.become_initiator(device);
                let deadline = self.devices[device]
                    .passive_activation_wait()
                    .map(|wait| now + wait);
                self.devices[device].pending = Some(Pending::ListPassive {
                    modulation,
                    deadline,
                });
            }
            Command::InCommunicateThru { .. } => {
                // No passive card is emulated, so nothing ever answers.
                self.become_initiator(device);
                let deadline = now + self.devices[device].communication_wait();
                self.devices[device].pending = Some(Pending::CommunicateThru { deadline });
            }
            Command::InDataExchange { target, data } => {
                self.data_exchange(device, target, data, now);
            }
            Command::InDeselect { .. } | Command::InRelease { .. } => {
                self.detach(device);
                if matches!(self.devices[device].role, Role::Initiator(_)) {
                    self.devices[device].role = Role::Initiator(InitiatorLink::None);
                } else {
                    self.devices[device].role = Role::Idle;
                }
                self.respond(device, code, &[STATUS_OK]);
            }
            Command::TgInitAsTarget(config) => self.arm_target(device, config),
            Command::TgGetData => self.get_data(device),
            Command::TgSetData { data } => self.set_data(device, &data),
            Command::Diagnose { .. }
            | Command::GetFirmwareVersion
            | Command::GetGeneralStatus
            | Command::ReadRegister { .. }
            | Command::WriteRegister { .. }
            | Command::SetParameters { .. }
            | Command::SamConfiguration { .. }
            | Command::PowerDown
            | Command::RfConfiguration { .. }
            | Command::TgGetTargetStatus => {
                // Device::run_local answers these; reaching here is a programming error.
                warn!(device, code, "local command reached the field");
                self.push_error_frame(device);
            }
        }
    }

    fn jump_for_dep(&mut self, device: usize, request: JumpForDepRequest, now: Instant) {
        self.detach(device);
        self.become_initiator(device);
        let deadline = self.devices[device]
            .jump_for_dep_wait()
            .map(|wait| now + wait);
        debug!(device, ?deadline, "looking for a DEP target");
        self.devices[device].pending = Some(Pending::JumpForDep { request, deadline });
    }

    fn arm_target(&mut self, device: usize, config: TargetConfig) {
        self.detach(device);
        info!(device, pty = ?self.devices[device].name, "target armed");
        self.devices[device].role = Role::Target(TargetState::Armed(config));
        self.devices[device].pending = Some(Pending::Activation);
    }

    fn data_exchange(&mut self, device: usize, target_number: u8, data: Vec<u8>, now: Instant) {
        let code = code::IN_DATA_EXCHANGE;
        let link = match self.devices[device].role {
            Role::Initiator(link) => link,
            _ => InitiatorLink::None,
        };
        let target = match link {
            InitiatorLink::Dep { target } if target_number == 1 => target,
            InitiatorLink::Dep { .. } | InitiatorLink::None => {
                self.respond(device, code, &[STATUS_NOT_ACCEPTABLE]);
                return;
            }
            InitiatorLink::Lost => {
                self.respond(device, code, &[STATUS_TIMEOUT]);
                return;
            }
        };
        let linked_back = matches!(
            self.devices[target].role,
            Role::Target(TargetState::Activated { initiator, .. }) if initiator == device
        );
        if !linked_back {
            self.respond(device, code, &[STATUS_TIMEOUT]);
            return;
        }
        if self.devices[target].pending == Some(Pending::GetData) {
            self.devices[target].pending = None;
            if let Role::Target(TargetState::Activated { exchange_open, .. }) =
                &mut self.devices[target].role
            {
                *exchange_open = true;
            }
            let mut response = Vec::with_capacity(data.len() + 1);
            response.push(STATUS_OK);
            response.extend_from_slice(&data);
            self.respond(target, code::TG_GET_DATA, &response);
        } else if let Role::Target(TargetState::Activated { inbox, .. }) =
            &mut self.devices[target].role
        {
            *inbox = Some(data);
        }
        self.devices[device].pending = Some(Pending::DataExchange {
            target,
            deadline: now + TARGET_RESPONSE_WAIT_MAX,
        });
    }

    fn get_data(&mut self, device: usize) {
        let code = code::TG_GET_DATA;
        match &mut self.devices[device].role {
            Role::Target(TargetState::Activated {
                inbox,
                exchange_open,
                ..
            }) => {
                if let Some(data) = inbox.take() {
                    *exchange_open = true;
                    let mut response = Vec::with_capacity(data.len() + 1);
                    response.push(STATUS_OK);
                    response.extend_from_slice(&data);
                    self.respond(device, code, &response);
                } else {
                    self.devices[device].pending = Some(Pending::GetData);
                }
            }
            Role::Target(TargetState::Released) => self.respond(device, code, &[STATUS_RELEASED]),
            _ => self.respond(device, code, &[STATUS_INVALID_DEP_STATE]),
        }
    }

    fn set_data(&mut self, device: usize, data: &[u8]) {
        let code = code::TG_SET_DATA;
        match &mut self.devices[device].role {
            Role::Target(TargetState::Activated {
                initiator,
                exchange_open,
                ..
            }) if *exchange_open => {
                *exchange_open = false;
                let initiator = *initiator;
                if matches!(
                    self.devices[initiator].pending,
                    Some(Pending::DataExchange { target, .. }) if target == device
                ) {
                    self.devices[initiator].pending = None;
                    let mut response = Vec::with_capacity(data.len() + 1);
                    response.push(STATUS_OK);
                    response.extend_from_slice(data);
                    self.respond(initiator, code::IN_DATA_EXCHANGE, &response);
                } else {
                    debug!(
                        device,
                        initiator, "initiator no longer waits for this answer"
                    );
                }
                self.respond(device, code, &[STATUS_OK]);
            }
            Role::Target(TargetState::Released) => self.respond(device, code, &[STATUS_RELEASED]),
            _ => self.respond(device, code, &[STATUS_INVALID_DEP_STATE]),
        }
    }

    /// Makes `device` an initiator, leaving any target role.
    fn become_initiator(&mut self, device: usize) {
        if !matches!(self.devices[device].role, Role::Initiator(_)) {
            self.detach(device);
            self.devices[device].role = Role::Initiator(InitiatorLink::None);
        }
    }

    /// Breaks every link `device` is part of, answering peers that wait on it. The device's
    /// own role is left for the caller to set.
    fn detach(&mut self, device: usize) {
        match self.devices[device].role.clone() {
            Role::Initiator(InitiatorLink::Dep { target }) => {
                info!(initiator = device, target, "DEP link released");
                self.devices[device].role = Role::Initiator(InitiatorLink::None);
                if matches!(
                    self.devices[target].role,
                    Role::Target(TargetState::Activated { initiator, .. }) if initiator == device
                ) {
                    self.devices[target].role = Role::Target(TargetState::Released);
                    if self.devices[target].pending == Some(Pending::GetData) {
                        self.devices[target].pending = None;
                        self.respond(target, code::TG_GET_DATA, &[STATUS_RELEASED]);
                    }
                }
            }
            Role::Target(TargetState::Activated { initiator, .. }) => {
                info!(initiator, target = device, "DEP target left the field");
                self.devices[device].role = Role::Target(TargetState::Released);
                if self.devices[initiator].role
                    == Role::Initiator(InitiatorLink::Dep { target: device })
                {
                    self.devices[initiator].role = Role::Initiator(InitiatorLink::Lost);
                    if matches!(
                        self.devices[initiator].pending,
                        Some(Pending::DataExchange { target, .. }) if target == device
                    ) {
                        self.devices[initiator].pending = None;
                        self.respond(initiator, code::IN_DATA_EXCHANGE, &[STATUS_TIMEOUT]);
                    }
                }
            }
            Role::Idle
            | Role::Initiator(InitiatorLink::None | InitiatorLink::Lost)
            | Role::Target(TargetState::Armed(_) | TargetState::Released) => {}
        }
    }

    /// Lets waiting initiators find armed targets.
    fn settle(&mut self) {
        for initiator in 0..self.devices.len() {
            match &self.devices[initiator].pending {
                Some(Pending::JumpForDep { request, .. }) => {
                    let request = request.clone();
                    if let Some(target) =
                        self.find_target(initiator, |config| dep_compatible(config, &request))
                    {
                        self.activate(initiator, target, &request);
                    }
                }
                Some(Pending::ListPassive { modulation, .. })
                    if *modulation == MODULATION_ISO14443A_106 =>
                {
                    if let Some(target) = self
                        .find_target(initiator, |config| config.mode & TARGET_MODE_PICC_ONLY == 0)
                    {
                        self.report_passive_target(initiator, target);
                    }
                }
                _ => {}
            }
        }
    }

    fn find_target(
        &self,
        initiator: usize,
        accepts: impl Fn(&TargetConfig) -> bool,
    ) -> Option<usize> {
        self.devices
            .iter()
            .enumerate()
            .find_map(|(index, device)| match &device.role {
                Role::Target(TargetState::Armed(config))
                    if index != initiator && accepts(config) =>
                {
                    Some(index)
                }
                _ => None,
            })
    }

    /// ATR_REQ/ATR_RES between `initiator` and the armed `target`.
    fn activate(&mut self, initiator: usize, target: usize, request: &JumpForDepRequest) {
        let Role::Target(TargetState::Armed(config)) = &self.devices[target].role else {
            return;
        };
        let config = config.clone();
        info!(initiator, target, baud_rate = ?request.baud_rate, active = request.active, "DEP link established");

        // Initiator: Status, NbTg, NFCID3t, DIDt, BSt, BRt, TO, PPt, Gt.
        let mut atr_response = Vec::with_capacity(17 + config.general_bytes.len());
        atr_response.extend([STATUS_OK, 0x01]);
        atr_response.extend_from_slice(&config.nfcid3);
        atr_response.extend([0x00, 0x00, 0x00, ATR_RESPONSE_TIMEOUT_VALUE]);
        atr_response.push(protocol_parameters(&config.general_bytes));
        atr_response.extend_from_slice(&config.general_bytes);

        // Target: Mode, then the initiator's ATR_REQ (LEN, D4 00, NFCID3i, DIDi, BSi, BRi,
        // PPi, Gi).
        let nfcid3i = request.nfcid3.unwrap_or_else(|| made_up_nfcid3(initiator));
        let atr_request_len = 1 + 2 + NFCID3_BYTES + 4 + request.general_bytes.len();
        let mut activation = Vec::with_capacity(atr_request_len + 1);
        activation.push(activated_mode(request));
        // atr_request_len <= 17 + INITIATOR_GENERAL_BYTES_MAX (48), checked by Command::parse.
        activation.push(atr_request_len as u8);
        activation.extend([0xD4, 0x00]);
        activation.extend_from_slice(&nfcid3i);
        activation.extend([0x00, 0x00, 0x00]);
        activation.push(protocol_parameters(&request.general_bytes));
        activation.extend_from_slice(&request.general_bytes);

        self.devices[initiator].pending = None;
        self.devices[initiator].role = Role::Initiator(InitiatorLink::Dep { target });
        self.devices[target].pending = None;
        self.devices[target].role = Role::Target(TargetState::Activated {
            initiator,
            inbox: None,
            exchange_open: false,
        });
        self.respond(initiator, code::IN_JUMP_FOR_DEP, &atr_response);
        self.respond(target, code::TG_INIT_AS_TARGET, &activation);
    }

    /// Answers InListPassiveTarget (ISO/IEC 14443-A) with an armed target's identity; the
    /// target stays armed, waiting for ATR_REQ.
    fn report_passive_target(&mut self, initiator: usize, target: usize) {
        let Role::Target(TargetState::Armed(config)) = &self.devices[target].role else {
            return;
        };
        let [sens_res_0, sens_res_1, uid_1, uid_2, uid_3, sel_res] = config.mifare;
        let response = [
            0x01, // NbTg
            0x01, // Tg
            sens_res_0,
            sens_res_1,
            sel_res,
            0x04, // NFCIDLength
            NFCID1_FIRST_BYTE,
            uid_1,
            uid_2,
            uid_3,
        ];
        debug!(
            initiator,
            target, "armed target answered passive activation"
        );
        self.devices[initiator].pending = None;
        self.respond(initiator, code::IN_LIST_PASSIVE_TARGET, &response);
    }

    fn respond(&mut self, device: usize, command_code: u8, data: &[u8]) {
        match encode_response(command_code.wrapping_add(1), data) {
            Ok(frame) => {
                self.devices[device].last_response = Some(frame.clone());
                self.push(device, frame);
            }
            Err(error) => {
                warn!(device, command_code, %error, "response does not fit a frame");
                self.push_error_frame(device);
            }
        }
    }

    fn push_error_frame(&mut self, device: usize) {
        self.devices[device].last_response = Some(ERROR_FRAME.to_vec());
        self.push(device, ERROR_FRAME.to_vec());
    }

    fn push(&mut self, device: usize, bytes: Vec<u8>) {
        self.outbox.push(Output { device, bytes });
    }
}

/// Whether an armed target accepts this InJumpForDEP.
fn dep_compatible(config: &TargetConfig, request: &JumpForDepRequest) -> bool {
    if config.mode & TARGET_MODE_PICC_ONLY != 0 {
        return false;
    }
    !(request.active && config.mode & TARGET_MODE_PASSIVE_ONLY != 0)
}

/// The mode byte TgInitAsTarget answers with: baud rate, DEP, framing.
fn activated_mode(request: &JumpForDepRequest) -> u8 {
    let framing = match (request.active, request.baud_rate) {
        (true, _) => 0x01,
        (false, DepBaudRate::Kbps106) => 0x00,
        (false, DepBaudRate::Kbps212 | DepBaudRate::Kbps424) => 0x02,
    };
    (request.baud_rate.index() << 4) | 0x04 | framing
}

fn protocol_parameters(general_bytes: &[u8]) -> u8 {
    if general_bytes.is_empty() {
        PROTOCOL_PARAMETERS_LR_254
    } else {
        PROTOCOL_PARAMETERS_LR_254 | PROTOCOL_PARAMETERS_GENERAL_BYTES
    }
}

/// The NFCID3i a device uses when the initiator's host gives none (a real PN532 draws one at
/// random; a fixed one per device keeps runs reproducible).
fn made_up_nfcid3(device: usize) -> [u8; NFCID3_BYTES] {
    let mut nfcid3 = [0; NFCID3_BYTES];
    nfcid3[..NFCID3_PREFIX.len()].copy_from_slice(&NFCID3_PREFIX);
    let index = u32::try_from(device).unwrap_or(u32::MAX).to_be_bytes();
    nfcid3[NFCID3_PREFIX.len()..].copy_from_slice(&index);
    nfcid3
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::frame::{FrameDecoder, InformationFrame, TFI_PN532_TO_HOST, encode_command};
    use super::*;

    const TARGET: usize = 0;
    const INITIATOR: usize = 1;

    /// Drives a field through in-memory links, decoding what each device's host receives.
    struct Bench {
        field: Field,
        hosts: Vec<FrameDecoder>,
        now: Instant,
    }

    impl Bench {
        fn new(devices: usize) -> Self {
            let names = (0..devices).map(|i| format!("dev{i}")).collect();
            Self {
                field: Field::new(names),
                hosts: (0..devices).map(|_| FrameDecoder::new()).collect(),
                now: Instant::now(),
            }
        }

        /// Sends a command; returns every frame each host received, by device.
        fn send(&mut self, device: usize, code: u8, params: &[u8]) -> Vec<Vec<Frame>> {
            let bytes = encode_command(code, params).unwrap();
            let outputs = self.field.receive(device, &bytes, self.now);
            self.decode(outputs)
        }

        fn send_raw(&mut self, device: usize, bytes: &[u8]) -> Vec<Vec<Frame>> {
            let outputs = self.field.receive(device, bytes, self.now);
            self.decode(outputs)
        }

        fn advance(&mut self, by: Duration) -> Vec<Vec<Frame>> {
            self.now += by;
            let outputs = self.field.expire(self.now);
            self.decode(outputs)
        }

        fn hang_up(&mut self, device: usize) -> Vec<Vec<Frame>> {
            let outputs = self.field.hang_up(device);
            self.decode(outputs)
        }

        fn decode(&mut self, outputs: Vec<Output>) -> Vec<Vec<Frame>> {
            let mut frames = vec![Vec::new(); self.hosts.len()];
            for output in outputs {
                for frame in self.hosts[output.device].feed(&output.bytes) {
                    frames[output.device].push(frame.unwrap());
                }
            }
            frames
        }

        fn arm_target(&mut self) {
            let frames = self.send(TARGET, code::TG_INIT_AS_TARGET, &nfc_dep_target_config());
            assert_eq!(frames[TARGET], vec![Frame::Ack]);
        }
    }

    fn response(code: u8, data: &[u8]) -> Frame {
        let mut payload = vec![code + 1];
        payload.extend_from_slice(data);
        Frame::Information(InformationFrame {
            tfi: TFI_PN532_TO_HOST,
            payload,
        })
    }

    /// TgInitAsTarget parameters as nfc-dep-target sends them.
    fn nfc_dep_target_config() -> Vec<u8> {
        let mut params = vec![0x02, 0x08, 0x00, 0x12, 0x34, 0x56, 0x40];
        params.extend([0x01, 0xFE, 0x12, 0x34, 0x56, 0x78, 0x90, 0x12]);
        params.extend([0xC0, 0xC1, 0xC2, 0xC3, 0xC4, 0xC5, 0xC6, 0xC7, 0x0F, 0xAB]);
        params.extend([0x12, 0x34, 0x56, 0x78, 0x9A, 0xBC, 0xDE, 0xFF, 0x00, 0x00]);
        params.extend([0x04, 0x12, 0x34, 0x56, 0x78, 0x00]);
        params
    }

    /// InJumpForDEP parameters as nfc-dep-initiator sends them (passive, 212 kbps).
    const JUMP_FOR_DEP_212: [u8; 8] = [0x00, 0x01, 0x01, 0x00, 0xFF, 0xFF, 0x00, 0x0F];

    fn link(bench: &mut Bench) {
        bench.arm_target();
        let frames = bench.send(INITIATOR, code::IN_JUMP_FOR_DEP, &JUMP_FOR_DEP_212);
        assert_eq!(frames[INITIATOR].len(), 2);
        assert_eq!(frames[TARGET].len(), 1);
    }

    #[test]
    fn acks_then_answers_each_command_after_wake_up() {
        let mut bench = Bench::new(1);
        let mut bytes = vec![0x55, 0x55, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        bytes.extend(encode_command(code::SAM_CONFIGURATION, &[0x01]).unwrap());
        let frames = bench.send_raw(0, &bytes);
        assert_eq!(
            frames[0],
            vec![Frame::Ack, response(code::SAM_CONFIGURATION, &[])]
        );
    }

    #[test]
    fn unknown_command_gets_error_frame() {
        let mut bench = Bench::new(1);
        let frames = bench.send(0, 0x60, &[0x01, 0x01, 0x00]);
        assert_eq!(
            frames[0],
            vec![
                Frame::Ack,
                Frame::Information(InformationFrame {
                    tfi: 0x7F,
                    payload: Vec::new()
                })
            ]
        );
    }

    #[test]
    fn nack_repeats_last_response() {
        let mut bench = Bench::new(1);
        bench.send(0, code::GET_FIRMWARE_VERSION, &[]);
        let frames = bench.send_raw(0, &super::super::frame::NACK_FRAME);
        assert_eq!(
            frames[0],
            vec![response(
                code::GET_FIRMWARE_VERSION,
                &[0x32, 0x01, 0x06, 0x07]
            )]
        );
    }

    #[test]
    fn dep_exchange_reaches_the_other_device() {
        let mut bench = Bench::new(2);
        bench.arm_target();
        let frames = bench.send(INITIATOR, code::IN_JUMP_FOR_DEP, &JUMP_FOR_DEP_212);
        let mut atr_response = vec![0x00, 0x01];
        atr_response.extend([0x12, 0x34, 0x56, 0x78, 0x9A, 0xBC, 0xDE, 0xFF, 0x00, 0x00]);
        atr_response.extend([0x00, 0x00, 0x00, 0x0E, 0x32, 0x12, 0x34, 0x56, 0x78]);
        assert_eq!(
            frames[INITIATOR],
            vec![Frame::Ack, response(code::IN_JUMP_FOR_DEP, &atr_response)]
        );
        let Frame::Information(activation) = &frames[TARGET][0] else {
            panic!("no activation");
        };
        // Mode: 212 kbps, DEP, FeliCa framing; then ATR_REQ of 17 bytes.
        assert_eq!(&activation.payload[..5], &[0x8D, 0x16, 0x11, 0xD4, 0x00]);

        // TgGetData first, then InDataExchange.
        let frames = bench.send(TARGET, code::TG_GET_DATA, &[]);
        assert_eq!(frames[TARGET], vec![Frame::Ack]);
        let frames = bench.send(INITIATOR, code::IN_DATA_EXCHANGE, b"\x01Hello World!\0");
        assert_eq!(frames[INITIATOR], vec![Frame::Ack]);
        assert_eq!(
            frames[TARGET],
            vec![response(code::TG_GET_DATA, b"\x00Hello World!\0")]
        );
        let frames = bench.send(TARGET, code::TG_SET_DATA, b"Hello Mars!\0");
        assert_eq!(
            frames[TARGET],
            vec![Frame::Ack, response(code::TG_SET_DATA, &[0x00])]
        );
        assert_eq!(
            frames[INITIATOR],
            vec![response(code::IN_DATA_EXCHANGE, b"\x00Hello Mars!\0")]
        );

        // InDataExchange first, then TgGetData finds the data waiting.
        bench.send(INITIATOR, code::IN_DATA_EXCHANGE, b"\x01again");
        let frames = bench.send(TARGET, code::TG_GET_DATA, &[]);
        assert_eq!(
            frames[TARGET],
            vec![Frame::Ack, response(code::TG_GET_DATA, b"\x00again")]
        );

        // The initiator deselects: the target's next TgGetData says "released".
        bench.send(TARGET, code::TG_SET_DATA, b"ok");
        let frames = bench.send(INITIATOR, code::IN_DESELECT, &[0x00]);
        assert_eq!(
            frames[INITIATOR],
            vec![Frame::Ack, response(code::IN_DESELECT, &[0x00])]
        );
        let frames = bench.send(TARGET, code::TG_GET_DATA, &[]);
        assert_eq!(
            frames[TARGET],
            vec![Frame::Ack, response(code::TG_GET_DATA, &[STATUS_RELEASED])]
        );
    }

    #[test]
    fn initiator_waits_for_a_target_armed_later() {
        let mut bench = Bench::new(2);
        let frames = bench.send(INITIATOR, code::IN_JUMP_FOR_DEP, &JUMP_FOR_DEP_212);
        assert_eq!(frames[INITIATOR], vec![Frame::Ack]);
        assert_eq!(bench.field.next_deadline(), None);
        let frames = bench.send(TARGET, code::TG_INIT_AS_TARGET, &nfc_dep_target_config());
        assert_eq!(frames[TARGET].len(), 2);
        assert_eq!(frames[INITIATOR].len(), 1);
    }

    #[test]
    fn no_target_times_out_after_the_configured_retries() {
        let mut bench = Bench::new(2);
        // MxRtyATR 0x02: three attempts of 102.4 ms.
        bench.send(INITIATOR, code::RF_CONFIGURATION, &[0x05, 0x02, 0x01, 0x02]);
        bench.send(INITIATOR, code::IN_JUMP_FOR_DEP, &JUMP_FOR_DEP_212);
        assert!(bench.advance(Duration::from_millis(300))[INITIATOR].is_empty());
        let frames = bench.advance(Duration::from_millis(10));
        assert_eq!(
            frames[INITIATOR],
            vec![response(code::IN_JUMP_FOR_DEP, &[STATUS_TIMEOUT])]
        );

        let frames = bench.send(INITIATOR, code::IN_LIST_PASSIVE_TARGET, &[0x01, 0x00]);
        assert_eq!(frames[INITIATOR], vec![Frame::Ack]);
        let frames = bench.advance(Duration::from_millis(15));
        assert_eq!(
            frames[INITIATOR],
            vec![response(code::IN_LIST_PASSIVE_TARGET, &[0x00])]
        );
    }

    #[test]
    fn armed_target_answers_passive_activation() {
        let mut bench = Bench::new(2);
        bench.arm_target();
        let frames = bench.send(INITIATOR, code::IN_LIST_PASSIVE_TARGET, &[0x01, 0x00]);
        assert_eq!(
            frames[INITIATOR],
            vec![
                Frame::Ack,
                response(
                    code::IN_LIST_PASSIVE_TARGET,
                    &[0x01, 0x01, 0x08, 0x00, 0x40, 0x04, 0x08, 0x12, 0x34, 0x56]
                )
            ]
        );
        assert!(matches!(
            bench.field.role(TARGET),
            Some(Role::Target(TargetState::Armed(_)))
        ));
    }

    #[test]
    fn target_hang_up_mid_exchange_fails_the_initiator() {
        let mut bench = Bench::new(2);
        link(&mut bench);
        bench.send(TARGET, code::TG_GET_DATA, &[]);
        bench.send(INITIATOR, code::IN_DATA_EXCHANGE, b"\x01Hello World!\0");
        let frames = bench.hang_up(TARGET);
        assert_eq!(
            frames[INITIATOR],
            vec![response(code::IN_DATA_EXCHANGE, &[STATUS_TIMEOUT])]
        );
        // Later exchanges fail at once, and the target is back to idle.
        let frames = bench.send(INITIATOR, code::IN_DATA_EXCHANGE, b"\x01again");
        assert_eq!(
            frames[INITIATOR],
            vec![
                Frame::Ack,
                response(code::IN_DATA_EXCHANGE, &[STATUS_TIMEOUT])
            ]
        );
        assert_eq!(bench.field.role(TARGET), Some(&Role::Idle));
    }

    #[test]
    fn initiator_hang_up_releases_a_waiting_target() {
        let mut bench = Bench::new(2);
        link(&mut bench);
        bench.send(TARGET, code::TG_GET_DATA, &[]);
        let frames = bench.hang_up(INITIATOR);
        assert_eq!(
            frames[TARGET],
            vec![response(code::TG_GET_DATA, &[STATUS_RELEASED])]
        );
    }

    #[test]
    fn silent_target_host_times_out_the_initiator() {
        let mut bench = Bench::new(2);
        link(&mut bench);
        bench.send(INITIATOR, code::IN_DATA_EXCHANGE, b"\x01ping");
        let frames = bench.advance(TARGET_RESPONSE_WAIT_MAX);
        assert_eq!(
            frames[INITIATOR],
            vec![response(code::IN_DATA_EXCHANGE, &[STATUS_TIMEOUT])]
        );
    }

    #[test]
    fn ack_aborts_an_armed_target() {
        let mut bench = Bench::new(2);
        bench.arm_target();
        let frames = bench.send_raw(TARGET, &ACK_FRAME);
        assert!(frames[TARGET].is_empty());
        assert_eq!(bench.field.role(TARGET), Some(&Role::Idle));
        // Nothing is armed any more: the initiator keeps looking.
        let frames = bench.send(INITIATOR, code::IN_JUMP_FOR_DEP, &JUMP_FOR_DEP_212);
        assert_eq!(frames[INITIATOR], vec![Frame::Ack]);
    }

    #[test]
    fn exchange_without_a_link_is_refused() {
        let mut bench = Bench::new(1);
        let frames = bench.send(0, code::IN_DATA_EXCHANGE, b"\x01data");
        assert_eq!(
            frames[0],
            vec![
                Frame::Ack,
                response(code::IN_DATA_EXCHANGE, &[STATUS_NOT_ACCEPTABLE])
            ]
        );
        let frames = bench.send(0, code::TG_SET_DATA, b"data");
        assert_eq!(
            frames[0],
            vec![
                Frame::Ack,
                response(code::TG_SET_DATA, &[STATUS_INVALID_DEP_STATE])
            ]
        );
    }

    mod properties {
        use proptest::prelude::*;

        use super::*;

        /// A host command from the set the field handles, with arbitrary parameters.
        fn any_command() -> impl Strategy<Value = (u8, Vec<u8>)> {
            let codes = prop::sample::select(vec![
                code::DIAGNOSE,
                code::GET_FIRMWARE_VERSION,
                code::READ_REGISTER,
                code::WRITE_REGISTER,
                code::RF_CONFIGURATION,
                code::IN_JUMP_FOR_DEP,
                code::IN_LIST_PASSIVE_TARGET,
                code::IN_DATA_EXCHANGE,
                code::IN_DESELECT,
                code::IN_RELEASE,
                code::TG_INIT_AS_TARGET,
                code::TG_GET_DATA,
                code::TG_SET_DATA,
            ]);
            (codes, proptest::collection::vec(any::<u8>(), 0..64))
        }

        proptest! {
            /// Whatever two hosts send, in whatever order, with hang-ups and time passing,
            /// the field never panics and every answer it writes is a well-formed frame.
            #[test]
            fn any_host_traffic_gets_well_formed_answers(
                steps in proptest::collection::vec(
                    (0_usize..2, any_command(), 0_u8..8, 0_u64..200),
                    0..64,
                )
            ) {
                let mut bench = Bench::new(2);
                for (device, (command_code, mut params), action, elapsed_ms) in steps {
                    // Keep the target config and DEP activations common enough to matter.
                    if command_code == code::TG_INIT_AS_TARGET && action < 4 {
                        params = nfc_dep_target_config();
                    }
                    if command_code == code::IN_JUMP_FOR_DEP && action < 4 {
                        params = JUMP_FOR_DEP_212.to_vec();
                    }
                    match action {
                        0 => { bench.hang_up(device); }
                        1 => { bench.send_raw(device, &ACK_FRAME); }
                        _ => { bench.send(device, command_code, &params); }
                    }
                    bench.advance(Duration::from_millis(elapsed_ms));
                }
            }

            #[test]
            fn any_bytes_on_a_line_never_panic(
                chunks in proptest::collection::vec(
                    proptest::collection::vec(any::<u8>(), 0..300),
                    0..8,
                )
            ) {
                let mut field = Field::new(vec!["dev0".into()]);
                let now = Instant::now();
                for chunk in chunks {
                    field.receive(0, &chunk, now);
                }
            }
        }
    }
}
