//! `cargo xtask package`: the Debian package of the platform, `nfcpay_<version>_<arch>.deb`.
//!
//! Staged by hand and built with `dpkg-deb --root-owner-group` (the equivalent of `cargo deb`,
//! with nothing to install): `nfcpayd` and `nfcpay-admin` (stripped) in `/usr/bin`, the unit
//! in `/lib/systemd/system`, the sample configuration as the conffile
//! `/etc/nfcpay/nfcpay.toml` (dpkg never overwrites an edited conffile), `softhsm-setup` and
//! the Grafana dashboard and Prometheus rules of `daemon/monitoring/` in `/usr/share/nfcpay`,
//! the docs in `/usr/share/doc/nfcpay`; dependencies from `dpkg-shlibdeps`. The maintainer
//! scripts make the layout of docs/operations.md §2: the `nfcpay` system user, `/etc/nfcpay`
//! `root:nfcpay` 0750, `/var/lib/nfcpay` `nfcpay` 0700 — owners and modes on the first
//! installation only, so that an upgrade keeps the operator's, and a configuration file the
//! operator deleted is no error. Every file they touch is under `$DPKG_ROOT` (set by
//! `dpkg --root`, empty otherwise), which is how the unit tests run them in a throwaway root.
//!
//! [`check`] (a step of `cargo xtask test`) builds it from the binaries the tests use, runs
//! `lintian` (no errors allowed) and `systemd-analyze verify` on the unit extracted with
//! `dpkg-deb -x` into a throwaway root.

use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::payment::Binaries;
use crate::steps::Steps;
use crate::{command, packages};

const PACKAGE: &str = "nfcpay";
const MAINTAINER: &str = "nfcpay maintainers <nfcpay@example.org>";
const BINARIES: [&str; 2] = ["nfcpayd", "nfcpay-admin"];
const DOCS: [&str; 5] = [
    "docs/operations.md",
    "docs/admin-cli.md",
    "docs/key-management.md",
    "docs/ledger.md",
    "docs/protocol.md",
];
const SOFTHSM_SETUP: [&str; 3] = ["init-token", "find-module", "softhsm2.conf.in"];
/// `daemon/monitoring/`, shipped in `/usr/share/nfcpay/monitoring` (docs/operations.md §9).
const MONITORING: [&str; 3] = ["alerts.yml", "alerts.test.yml", "dashboard.json"];
/// Lintian fails on errors; its warnings (no man pages yet, systemctl in prerm) are shown.
const LINTIAN_ARGUMENTS: [&str; 4] = ["--fail-on", "error", "--tag-display-limit", "0"];

const POSTINST: &str = r#"#!/bin/sh
# nfcpay postinst: the layout of docs/operations.md §2. Never touches an existing
# configuration's content (it is a conffile: dpkg keeps an edited one). Owners and modes are
# set on the first installation only ($2, the version configured before, is empty): an
# upgrade keeps the operator's. A configuration file the operator deleted stays deleted.
set -e
if [ "$1" = configure ]; then
    if ! getent passwd nfcpay >/dev/null; then
        adduser --system --group --home /var/lib/nfcpay --no-create-home \
            --shell /usr/sbin/nologin nfcpay
    fi
    if [ -z "$2" ]; then
        chown root:nfcpay "$DPKG_ROOT/etc/nfcpay"
        chmod 0750 "$DPKG_ROOT/etc/nfcpay"
        if [ -f "$DPKG_ROOT/etc/nfcpay/nfcpay.toml" ]; then
            chown root:nfcpay "$DPKG_ROOT/etc/nfcpay/nfcpay.toml"
            chmod 0640 "$DPKG_ROOT/etc/nfcpay/nfcpay.toml"
        fi
    fi
    if [ -z "$2" ] || [ ! -d "$DPKG_ROOT/var/lib/nfcpay" ]; then
        install -d -o nfcpay -g nfcpay -m 0700 "$DPKG_ROOT/var/lib/nfcpay"
    fi
fi
#DEBHELPER#
if [ "$1" = configure ] && [ -d /run/systemd/system ]; then
    systemctl --system daemon-reload >/dev/null || true
fi
exit 0
"#;

const POSTRM: &str = r#"#!/bin/sh
# nfcpay postrm: the ledger, certificates and token in /var/lib/nfcpay are the operator's
# to remove (a purge leaves them); the nfcpay user stays, as Debian policy asks.
set -e
if [ -d /run/systemd/system ]; then
    systemctl --system daemon-reload >/dev/null || true
fi
exit 0
"#;

const PRERM: &str = r#"#!/bin/sh
set -e
if [ "$1" = remove ] && [ -d /run/systemd/system ]; then
    systemctl stop nfcpayd.service >/dev/null 2>&1 || true
fi
exit 0
"#;

/// Builds the package from the release (or debug) binaries, building them first; returns its
/// path (`target/package/nfcpay_<version>_<arch>.deb`).
pub fn build(root: &Path, release: bool) -> Result<PathBuf> {
    let mut cargo = command::cargo();
    cargo.current_dir(root);
    if release {
        cargo.args(["build", "--release", "-p", "nfcpay-daemon", "--bins"]);
    } else {
        // As `cargo xtask test` builds them (the same features: nothing to rebuild).
        cargo.args(["build", "--workspace", "--bins"]);
    }
    command::run(&mut cargo)?;
    let binaries = if release {
        Binaries::release(root)
    } else {
        Binaries::new(root)
    };
    let out = Binaries::target(root).join("package");
    let stage = out.join("stage");
    let _ = fs::remove_dir_all(&stage);
    fs::create_dir_all(&stage)?;
    let version = env!("CARGO_PKG_VERSION");
    for name in BINARIES {
        let target = stage.join("usr/bin").join(name);
        install(&binaries.path(name), &target, 0o755)?;
        command::run(
            Command::new("strip")
                .args(["--strip-unneeded", "--remove-section=.comment"])
                .arg(&target),
        )?;
    }
    install(
        &root.join("daemon/systemd/nfcpayd.service"),
        &stage.join("lib/systemd/system/nfcpayd.service"),
        0o644,
    )?;
    install(
        &root.join("daemon/nfcpay.sample.toml"),
        &stage.join("etc/nfcpay/nfcpay.toml"),
        // 0640 root:nfcpay once postinst has made the group.
        0o644,
    )?;
    for name in SOFTHSM_SETUP {
        let mode = if name.ends_with(".in") { 0o644 } else { 0o755 };
        install(
            &root.join("softhsm-setup").join(name),
            &stage.join("usr/share/nfcpay/softhsm-setup").join(name),
            mode,
        )?;
    }
    for name in MONITORING {
        install(
            &root.join("daemon/monitoring").join(name),
            &stage.join("usr/share/nfcpay/monitoring").join(name),
            0o644,
        )?;
    }
    let doc = stage.join("usr/share/doc").join(PACKAGE);
    for file in DOCS {
        install(
            &root.join(file),
            &doc.join(Path::new(file).file_name().context("a doc file name")?),
            0o644,
        )?;
    }
    fs::write(doc.join("copyright"), copyright())?;
    // A native package (no Debian revision): changelog.gz, not changelog.Debian.gz.
    let changelog = doc.join("changelog");
    fs::write(&changelog, changelog_text(version))?;
    command::run(Command::new("gzip").args(["-9n"]).arg(&changelog))?;
    let depends = shlib_depends(root, &stage)?;
    let control = stage.join("DEBIAN");
    fs::create_dir_all(&control)?;
    fs::write(
        control.join("control"),
        control_text(version, &depends, installed_size_kib(&stage)?),
    )?;
    fs::write(control.join("conffiles"), "/etc/nfcpay/nfcpay.toml\n")?;
    for (name, text) in [("postinst", POSTINST), ("postrm", POSTRM), ("prerm", PRERM)] {
        let text = maintainer_script(text);
        let path = control.join(name);
        fs::write(&path, text)?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755))?;
    }
    for directory in walk_directories(&stage)? {
        fs::set_permissions(&directory, fs::Permissions::from_mode(0o755))?;
    }
    let deb = out.join(format!("{PACKAGE}_{version}_{}.deb", architecture()?));
    command::run(
        Command::new("dpkg-deb")
            .args(["--root-owner-group", "-Zxz", "--build"])
            .arg(&stage)
            .arg(&deb),
    )?;
    println!("built {}", deb.display());
    Ok(deb)
}

/// Builds the package from the debug binaries and checks it: lintian, and
/// `systemd-analyze verify` on the unit in a throwaway root made with `dpkg-deb -x`.
pub fn check(root: &Path) -> Result<()> {
    let mut steps = Steps::new("package");
    steps.run("system packages", || {
        packages::ensure(packages::FOR_PACKAGE)
    })?;
    let deb = steps.run("build the .deb (dpkg-deb)", || build(root, false))?;
    steps.run("lintian (no errors)", || {
        command::run(Command::new("lintian").args(LINTIAN_ARGUMENTS).arg(&deb))
    })?;
    steps.run("systemd-analyze verify the installed unit", || {
        let extracted = tempfile::tempdir()?;
        command::run(
            Command::new("dpkg-deb")
                .arg("-x")
                .arg(&deb)
                .arg(extracted.path()),
        )?;
        let unit = extracted.path().join("lib/systemd/system/nfcpayd.service");
        if !unit.is_file() {
            bail!("the package has no lib/systemd/system/nfcpayd.service");
        }
        // What an installed system has and the throwaway root lacks: the system's own units
        // (sysinit.target, network-online.target, …) and /bin/kill (ExecReload=).
        command::run(
            Command::new("cp")
                .args(["-an", "/lib/systemd/system/."])
                .arg(extracted.path().join("lib/systemd/system")),
        )?;
        install(
            Path::new("/bin/kill"),
            &extracted.path().join("bin/kill"),
            0o755,
        )?;
        let output = command::capture(
            Command::new("systemd-analyze")
                .args(["verify", "--man=no"])
                .arg("--root")
                .arg(extracted.path())
                .arg("/lib/systemd/system/nfcpayd.service"),
        )?;
        let messages = String::from_utf8_lossy(&output.stderr);
        print!("{messages}");
        // Only this unit's own lines count (the throwaway root lacks the system's units).
        let own: Vec<&str> = messages
            .lines()
            .filter(|line| line.contains("nfcpayd.service"))
            .collect();
        if !own.is_empty() {
            bail!("systemd-analyze verify found problems in the unit: {own:?}");
        }
        Ok(())
    })?;
    steps.finish();
    Ok(())
}

/// A maintainer script as shipped: without debhelper's placeholder (nothing fills it here).
fn maintainer_script(text: &str) -> String {
    text.replace("#DEBHELPER#\n", "")
}

fn install(source: &Path, target: &Path, mode: u32) -> Result<()> {
    if let Some(parent) = target.parent() {
        fs::create_dir_all(parent)?;
    }
    fs::copy(source, target).with_context(|| format!("cannot copy {}", source.display()))?;
    fs::set_permissions(target, fs::Permissions::from_mode(mode))?;
    Ok(())
}

fn walk_directories(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut found = vec![dir.to_path_buf()];
    let mut index = 0;
    while let Some(current) = found.get(index).cloned() {
        for entry in fs::read_dir(&current)? {
            let entry = entry?;
            if entry.file_type()?.is_dir() {
                found.push(entry.path());
            }
        }
        index += 1;
    }
    Ok(found)
}

/// `shlibs:Depends` of the binaries, from `dpkg-shlibdeps` (which wants a debian/control).
fn shlib_depends(root: &Path, stage: &Path) -> Result<String> {
    let work = tempfile::tempdir()?;
    fs::create_dir_all(work.path().join("debian"))?;
    fs::write(
        work.path().join("debian/control"),
        format!("Source: {PACKAGE}\n\nPackage: {PACKAGE}\nArchitecture: any\n"),
    )?;
    let mut shlibdeps = Command::new("dpkg-shlibdeps");
    shlibdeps.arg("-O").current_dir(work.path());
    for name in BINARIES {
        shlibdeps.arg(stage.join("usr/bin").join(name));
    }
    let _ = root;
    let output = command::stdout_of(&mut shlibdeps)?;
    output
        .lines()
        .find_map(|line| line.strip_prefix("shlibs:Depends="))
        .map(str::to_owned)
        .context("dpkg-shlibdeps printed no shlibs:Depends")
}

fn installed_size_kib(stage: &Path) -> Result<u64> {
    let output = command::stdout_of(Command::new("du").args(["-sk"]).arg(stage))?;
    output
        .split_whitespace()
        .next()
        .and_then(|size| size.parse().ok())
        .context("du printed no size")
}

fn architecture() -> Result<String> {
    Ok(
        command::stdout_of(Command::new("dpkg").arg("--print-architecture"))?
            .trim()
            .to_owned(),
    )
}

fn control_text(version: &str, depends: &str, installed_size_kib: u64) -> String {
    format!(
        "Package: {PACKAGE}\n\
         Version: {version}\n\
         Architecture: {architecture}\n\
         Maintainer: {MAINTAINER}\n\
         Installed-Size: {installed_size_kib}\n\
         Depends: adduser, {depends}\n\
         Recommends: softhsm2, opensc\n\
         Suggests: postgresql, sqlite3\n\
         Section: net\n\
         Priority: optional\n\
         Homepage: https://example.org/nfcpay\n\
         Description: NFC payment platform daemon and operator CLI\n \
         nfcpayd verifies and settles payments between NFC terminals: both halves of\n \
         a payment are protected under AES DUKPT keys derived inside a PKCS#11 HSM,\n \
         matched, and settled exactly once in a double-entry ledger (SQLite or\n \
         PostgreSQL). nfcpay-admin runs the key ceremony and manages accounts,\n \
         terminals and the audit log.\n",
        architecture = architecture().unwrap_or_else(|_| "amd64".into()),
    )
}

fn changelog_text(version: &str) -> String {
    format!(
        "{PACKAGE} ({version}) unstable; urgency=medium\n\n  * Package built by cargo xtask package.\n\n -- {MAINTAINER}  Thu, 01 Jan 2026 00:00:00 +0000\n"
    )
}

fn copyright() -> String {
    format!(
        "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\
         Upstream-Name: {PACKAGE}\n\n\
         Files: *\n\
         Copyright: 2026 nfcpay authors\n\
         License: Apache-2.0\n \
         On Debian systems, the full text of the Apache License, Version 2.0 can be\n \
         found in the file /usr/share/common-licenses/Apache-2.0.\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_control_file_has_the_fields_dpkg_needs() {
        let control = control_text("0.1.0", "libc6 (>= 2.34)", 1234);
        for field in [
            "Package: nfcpay\n",
            "Version: 0.1.0\n",
            "Depends: adduser, libc6 (>= 2.34)\n",
            "Installed-Size: 1234\n",
            "Description: NFC payment platform daemon and operator CLI\n ",
        ] {
            assert!(control.contains(field), "{field:?} in\n{control}");
        }
        assert!(control.ends_with('\n'));
    }

    #[test]
    fn the_maintainer_scripts_make_the_documented_layout_and_keep_edited_configuration() {
        assert!(POSTINST.contains("adduser --system --group --home /var/lib/nfcpay"));
        for script in [POSTINST, POSTRM, PRERM] {
            assert!(
                !script.contains("nfcpay.toml >"),
                "never writes the configuration"
            );
            assert!(
                !script.contains("rm -rf /var/lib/nfcpay"),
                "never deletes the ledger"
            );
        }
    }

    #[test]
    fn every_monitoring_file_and_the_admin_cli_doc_are_shipped() {
        let root = crate::workspace_root();
        let mut files: Vec<String> = fs::read_dir(root.join("daemon/monitoring"))
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        files.sort();
        let mut shipped: Vec<String> = MONITORING.iter().map(|name| (*name).to_owned()).collect();
        shipped.sort();
        assert_eq!(files, shipped, "daemon/monitoring/ and MONITORING differ");
        assert!(DOCS.contains(&"docs/admin-cli.md"));
        for doc in DOCS {
            assert!(root.join(doc).is_file(), "{doc}");
        }
    }

    /// A throwaway root with what dpkg unpacks before `postinst configure`: `/etc/nfcpay` and
    /// the conffile (as packed: 0644, like the directory).
    fn unpacked_root() -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        let etc = root.path().join("etc/nfcpay");
        fs::create_dir_all(&etc).unwrap();
        fs::set_permissions(&etc, fs::Permissions::from_mode(0o755)).unwrap();
        fs::write(etc.join("nfcpay.toml"), "# sample\n").unwrap();
        fs::set_permissions(etc.join("nfcpay.toml"), fs::Permissions::from_mode(0o644)).unwrap();
        root
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    /// Runs the shipped postinst as dpkg does (`configure PREVIOUS_VERSION`) with `$DPKG_ROOT`
    /// at `root`. The commands that would change the real system's users, owners or systemd
    /// (`getent`, `adduser`, `chown`, `install`, `systemctl`) are stand-ins that record their
    /// arguments (`install -d` makes the directory, owned by the caller); `chmod` is real.
    /// Returns whether it succeeded and the record.
    fn postinst(root: &Path, previous: &str, user_exists: bool) -> (bool, String) {
        let tools = tempfile::tempdir().unwrap();
        let log = tools.path().join("calls");
        let stand_in = |name: &str, body: &str| {
            let path = tools.path().join(name);
            fs::write(
                &path,
                format!(
                    "#!/bin/sh\necho \"{name} $*\" >>\"{}\"\n{body}\n",
                    log.display()
                ),
            )
            .unwrap();
            fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
        };
        stand_in("getent", if user_exists { "exit 0" } else { "exit 2" });
        stand_in("adduser", "exit 0");
        stand_in("chown", "exit 0");
        stand_in("systemctl", "exit 0");
        stand_in("install", "for last; do :; done\nmkdir -p \"$last\"");
        let script = tools.path().join("postinst");
        fs::write(&script, maintainer_script(POSTINST)).unwrap();
        let status = Command::new("sh")
            .arg(&script)
            .args(["configure", previous])
            .env("DPKG_ROOT", root)
            .env("PATH", format!("{}:/usr/bin:/bin", tools.path().display()))
            .status()
            .unwrap();
        (
            status.success(),
            fs::read_to_string(&log).unwrap_or_default(),
        )
    }

    #[test]
    fn the_first_installation_makes_the_layout() {
        let root = unpacked_root();
        let (ok, calls) = postinst(root.path(), "", false);
        assert!(ok, "{calls}");
        let at = |path: &str| root.path().join(path);
        assert!(
            calls.contains("adduser --system --group --home /var/lib/nfcpay"),
            "{calls}"
        );
        for call in [
            format!("chown root:nfcpay {}", at("etc/nfcpay").display()),
            format!(
                "chown root:nfcpay {}",
                at("etc/nfcpay/nfcpay.toml").display()
            ),
            format!(
                "install -d -o nfcpay -g nfcpay -m 0700 {}",
                at("var/lib/nfcpay").display()
            ),
        ] {
            assert!(
                calls.lines().any(|line| line == call),
                "{call:?} not in\n{calls}"
            );
        }
        assert_eq!(mode(&at("etc/nfcpay")), 0o750);
        assert_eq!(mode(&at("etc/nfcpay/nfcpay.toml")), 0o640);
        assert!(at("var/lib/nfcpay").is_dir());
    }

    #[test]
    fn an_upgrade_keeps_the_operators_owners_and_modes() {
        let root = unpacked_root();
        let at = |path: &str| root.path().join(path);
        fs::set_permissions(at("etc/nfcpay"), fs::Permissions::from_mode(0o700)).unwrap();
        fs::set_permissions(
            at("etc/nfcpay/nfcpay.toml"),
            fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        fs::create_dir_all(at("var/lib/nfcpay")).unwrap();
        let (ok, calls) = postinst(root.path(), "0.1.0", true);
        assert!(ok, "{calls}");
        assert!(
            !calls.contains("adduser") && !calls.contains("chown"),
            "{calls}"
        );
        assert!(!calls.contains("install"), "{calls}");
        assert_eq!(mode(&at("etc/nfcpay")), 0o700);
        assert_eq!(mode(&at("etc/nfcpay/nfcpay.toml")), 0o600);
    }

    #[test]
    fn a_deleted_configuration_is_no_error_and_stays_deleted() {
        for previous in ["0.1.0", ""] {
            let root = unpacked_root();
            let conffile = root.path().join("etc/nfcpay/nfcpay.toml");
            fs::remove_file(&conffile).unwrap();
            let (ok, calls) = postinst(root.path(), previous, true);
            assert!(ok, "configure {previous:?}: {calls}");
            assert!(!conffile.exists());
            assert!(!calls.contains("nfcpay.toml"), "{calls}");
        }
    }

    #[test]
    fn an_upgrade_makes_a_missing_state_directory() {
        let root = unpacked_root();
        let (ok, calls) = postinst(root.path(), "0.1.0", true);
        assert!(ok, "{calls}");
        let state = root.path().join("var/lib/nfcpay");
        assert!(
            calls.contains(&format!(
                "install -d -o nfcpay -g nfcpay -m 0700 {}",
                state.display()
            )),
            "{calls}"
        );
        assert!(state.is_dir());
    }
}
