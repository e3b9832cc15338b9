//! Makes sure the Debian packages a task needs are installed.
//!
//! Missing packages are found with `dpkg-query`; only those are installed with
//! `apt-get install` (through `sudo` when not root). `apt-get update` runs only if the
//! install fails without it, so an up-to-date machine costs nothing and needs no network.

use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::command;

/// A Debian package and why nfcpay needs it.
#[derive(Clone, Copy)]
pub struct Package {
    pub name: &'static str,
    pub purpose: &'static str,
}

impl Package {
    const fn new(name: &'static str, purpose: &'static str) -> Self {
        Self { name, purpose }
    }
}

pub const SOFTHSM2: Package = Package::new("softhsm2", "PKCS#11 token for tests and the demo");
pub const OPENSC: Package = Package::new("opensc", "pkcs11-tool, to inspect the token");
pub const LIBNFC_DEV: Package = Package::new("libnfc-dev", "libnfc headers for the nfc1 crate");
pub const LIBNFC_BIN: Package = Package::new("libnfc-bin", "nfc-list and other libnfc tools");
pub const LIBNFC_EXAMPLES: Package = Package::new(
    "libnfc-examples",
    "nfc-dep-initiator/-target, NFC-DEP examples",
);
pub const LIBCLANG_DEV: Package = Package::new("libclang-dev", "bindgen for the nfc1 crate");
pub const PKG_CONFIG: Package = Package::new("pkg-config", "locates libnfc at build time");
pub const POSTGRESQL: Package = Package::new("postgresql", "server for the PostgreSQL test suite");
pub const SQLITE3: Package = Package::new("sqlite3", "the documented SQLite backup (deploy-check)");
pub const OPENSSL: Package =
    Package::new("openssl", "the documented PIN generation (deploy-check)");
pub const IPROUTE2: Package =
    Package::new("iproute2", "loopback in deploy-check's network namespace");
pub const LINTIAN: Package = Package::new("lintian", "checks the .deb (cargo xtask package)");
pub const DPKG_DEV: Package =
    Package::new("dpkg-dev", "dpkg-shlibdeps for the .deb's dependencies");
pub const BINUTILS: Package = Package::new("binutils", "strip, for the .deb's binaries");
pub const SYSTEMD: Package = Package::new(
    "systemd",
    "systemd-analyze, to check the unit's sandboxing offline (deploy-check)",
);
pub const UTIL_LINUX: Package = Package::new("util-linux", "unshare and runuser for deploy-check");
pub const PROMETHEUS: Package = Package::new(
    "prometheus",
    "promtool, to check and unit-test daemon/monitoring/alerts.yml",
);
pub const JQ: Package = Package::new(
    "jq",
    "drives nfcpay-admin --format json in docs/admin-cli.md's script (admin_cli tests)",
);
pub const P11_KIT_MODULES: Package = Package::new(
    "p11-kit-modules",
    "p11-kit-proxy.so, to run the PKCS#11 suites through p11-kit's proxy",
);

/// Everything `cargo xtask test` needs.
pub const FOR_TEST: &[Package] = &[
    SOFTHSM2,
    OPENSC,
    LIBNFC_DEV,
    LIBNFC_BIN,
    LIBNFC_EXAMPLES,
    LIBCLANG_DEV,
    PKG_CONFIG,
    POSTGRESQL,
    SQLITE3,
    OPENSSL,
    IPROUTE2,
    UTIL_LINUX,
    SYSTEMD,
    LINTIAN,
    DPKG_DEV,
    BINUTILS,
    PROMETHEUS,
    JQ,
    P11_KIT_MODULES,
];

/// Everything `cargo xtask deploy-check` needs.
pub const FOR_DEPLOY_CHECK: &[Package] = &[
    SOFTHSM2, OPENSC, POSTGRESQL, SQLITE3, OPENSSL, IPROUTE2, UTIL_LINUX, SYSTEMD,
];

/// Everything `cargo xtask package` needs.
pub const FOR_PACKAGE: &[Package] = &[LINTIAN, DPKG_DEV, BINUTILS];

/// Everything `cargo xtask demo` needs.
pub const FOR_DEMO: &[Package] = &[SOFTHSM2, OPENSC, LIBNFC_DEV, LIBCLANG_DEV, PKG_CONFIG];

/// Installs those of `packages` that are not installed yet.
pub fn ensure(packages: &[Package]) -> Result<()> {
    if command::find_in_path("dpkg-query").is_none() {
        println!(
            "dpkg-query not found (not a Debian system?): cannot check packages; \
             make sure these are installed: {}",
            names(packages)
        );
        return Ok(());
    }
    let missing: Vec<Package> = packages
        .iter()
        .copied()
        .filter(|package| !is_installed(package.name))
        .collect();
    if missing.is_empty() {
        println!("all needed packages are installed: {}", names(packages));
        return Ok(());
    }
    for package in &missing {
        println!("installing: {} ({})", package.name, package.purpose);
    }
    install(&missing)
}

fn is_installed(name: &str) -> bool {
    command::capture(Command::new("dpkg-query").args(["-W", "-f=${Status}", name])).is_ok_and(
        |output| {
            output.status.success()
                && status_means_installed(&String::from_utf8_lossy(&output.stdout))
        },
    )
}

/// `dpkg-query -f='${Status}'` prints "want flag status", e.g. "install ok installed";
/// "deinstall ok config-files" is a removed package.
fn status_means_installed(status: &str) -> bool {
    status.split_whitespace().nth(2) == Some("installed")
}

fn install(missing: &[Package]) -> Result<()> {
    if apt_get(&["install", "-y", "--no-install-recommends"], missing).is_ok() {
        return Ok(());
    }
    println!("install failed; refreshing the package lists and trying again");
    apt_get(&["update"], &[])?;
    apt_get(&["install", "-y", "--no-install-recommends"], missing)
        .with_context(|| format!("could not install {}", names(missing)))
}

fn apt_get(arguments: &[&str], packages: &[Package]) -> Result<()> {
    let mut apt_get = if is_root() {
        let mut apt_get = Command::new("apt-get");
        apt_get.env("DEBIAN_FRONTEND", "noninteractive");
        apt_get
    } else {
        if command::find_in_path("sudo").is_none() {
            bail!(
                "not root and sudo not found: install {} yourself",
                names(packages)
            );
        }
        // sudo resets the environment, so the variable goes on its command line.
        let mut sudo = Command::new("sudo");
        sudo.args(["DEBIAN_FRONTEND=noninteractive", "apt-get"]);
        sudo
    };
    apt_get
        .args(arguments)
        .args(packages.iter().map(|package| package.name));
    command::run(&mut apt_get)
}

/// Whether we run with effective user id 0, read from `/proc/self/status`.
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| effective_uid(&status))
        == Some(0)
}

/// The effective uid from the `Uid:` line (real, effective, saved, filesystem).
fn effective_uid(status: &str) -> Option<u32> {
    status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn names(packages: &[Package]) -> String {
    packages
        .iter()
        .map(|package| package.name)
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dpkg_status_is_read() {
        assert!(status_means_installed("install ok installed"));
        assert!(status_means_installed("hold ok installed"));
        assert!(!status_means_installed("deinstall ok config-files"));
        assert!(!status_means_installed("install ok half-installed"));
        assert!(!status_means_installed(""));
    }

    #[test]
    fn effective_uid_is_the_second_field() {
        let status = "Name:\tcargo\nUid:\t1000\t0\t1000\t1000\nGid:\t1000\t1000\t1000\t1000\n";
        assert_eq!(effective_uid(status), Some(0));
        assert_eq!(effective_uid("Name:\tcargo\n"), None);
    }

    #[test]
    fn demo_packages_are_part_of_the_test_packages() {
        for package in FOR_DEMO.iter().chain(FOR_DEPLOY_CHECK).chain(FOR_PACKAGE) {
            assert!(FOR_TEST.iter().any(|other| other.name == package.name));
        }
    }
}
