//! `fleetlet-hub pki`: a development PKI for the link (CA, hub serving certificate, device client
//! certificates). Production deployments bring their own CA (e.g. Flightctl's device CA); this
//! exists so the demo and the tests run with real mutual TLS.
//!
//! Layout under `--dir`:
//! `ca.pem`, `ca-key.pem`, `hub.pem`, `hub-key.pem`, `devices/<name>.pem`, `devices/<name>-key.pem`.
//! Keys are written with mode 0600; every file is replaced atomically.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

/// Errors of the PKI commands. None is retryable without fixing the cause named.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// Key generation, signing or parsing failed.
    #[error("{what}: {source}")]
    Crypto {
        /// What was being done.
        what: String,
        /// What rcgen said.
        source: rcgen::Error,
    },
    /// `init` would overwrite an existing CA.
    #[error(
        "{path} already exists; pass --force to replace the CA (invalidates every issued certificate)"
    )]
    Exists {
        /// The existing CA certificate.
        path: PathBuf,
    },
    /// A name is not usable in a certificate or file name.
    #[error("invalid name {name:?}: {reason}")]
    InvalidName {
        /// The name given.
        name: String,
        /// Why it is refused.
        reason: &'static str,
    },
}

/// `fleetlet-hub pki ...`
#[derive(Debug, clap::Args)]
pub struct PkiArgs {
    /// Directory holding the PKI files.
    #[arg(long, default_value = "pki", global = true)]
    pub dir: PathBuf,
    /// Validity of newly issued certificates, in days.
    #[arg(long, default_value_t = 365, global = true)]
    pub days: u32,
    /// What to create.
    #[command(subcommand)]
    pub command: PkiCommand,
}

/// The PKI subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum PkiCommand {
    /// Create the CA (`ca.pem`, `ca-key.pem`).
    Init {
        /// Replace an existing CA.
        #[arg(long)]
        force: bool,
    },
    /// Issue the hub's serving certificate (`hub.pem`, `hub-key.pem`).
    IssueServer {
        /// DNS names or IP addresses the hub is reached at (repeatable).
        #[arg(long = "name", required = true)]
        names: Vec<String>,
    },
    /// Issue a device's client certificate (`devices/<name>.pem`, `devices/<name>-key.pem`).
    IssueDevice {
        /// The device name (becomes the certificate's common name, after `--cn-prefix`).
        name: String,
        /// Prefix put before the name in the common name (match the hub's `identity_prefix`).
        #[arg(long, default_value = "")]
        cn_prefix: String,
    },
}

/// Run a `pki` subcommand and print what was written.
pub fn run(args: &PkiArgs) -> Result<(), PkiError> {
    let validity = time_span(args.days);
    let written = match &args.command {
        PkiCommand::Init { force } => init(&args.dir, *force)?,
        PkiCommand::IssueServer { names } => issue_server(&args.dir, names, validity)?,
        PkiCommand::IssueDevice { name, cn_prefix } => {
            issue_device(&args.dir, name, cn_prefix, validity)?
        }
    };
    // The files are written; a reader that went away (`| head`) changes nothing about that.
    for path in written {
        fleetlet_proto::outln!("wrote {}", path.display()).map_err(|source| PkiError::Io {
            path: PathBuf::from("<stdout>"),
            source,
        })?;
    }
    Ok(())
}

/// A validity window: from an hour ago (clock skew) to `days` from now.
pub fn time_span(days: u32) -> Validity {
    let now = time::OffsetDateTime::now_utc();
    Validity {
        not_before: now - time::Duration::hours(1),
        not_after: now + time::Duration::days(i64::from(days)),
    }
}

/// When a certificate is valid.
#[derive(Debug, Clone, Copy)]
pub struct Validity {
    /// Start.
    pub not_before: time::OffsetDateTime,
    /// End.
    pub not_after: time::OffsetDateTime,
}

/// Paths of the PKI files under `dir`.
pub fn ca_paths(dir: &Path) -> (PathBuf, PathBuf) {
    (dir.join("ca.pem"), dir.join("ca-key.pem"))
}

/// Create a CA in `dir`.
pub fn init(dir: &Path, force: bool) -> Result<Vec<PathBuf>, PkiError> {
    let (cert_path, key_path) = ca_paths(dir);
    if cert_path.exists() && !force {
        return Err(PkiError::Exists { path: cert_path });
    }
    let key = generate_key()?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    // A distinct name per CA: verifiers look issuers up by name, so two development CAs with
    // the same name would make a foreign certificate look like a bad signature instead of an
    // unknown issuer.
    let tag = time::OffsetDateTime::now_utc().unix_timestamp_nanos() as u64 & 0xffff_ffff;
    dn.push(
        DnType::CommonName,
        format!("fleetlet development CA {tag:08x}"),
    );
    dn.push(DnType::OrganizationName, "fleetlet");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let span = time_span(3650);
    params.not_before = span.not_before;
    params.not_after = span.not_after;
    let cert = params
        .self_signed(&key)
        .map_err(crypto("self-signing the CA"))?;
    write_file(&cert_path, cert.pem().as_bytes(), 0o644)?;
    write_file(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
    Ok(vec![cert_path, key_path])
}

/// The CA in `dir`, ready to sign.
fn load_ca(dir: &Path) -> Result<Issuer<'static, KeyPair>, PkiError> {
    let (cert_path, key_path) = ca_paths(dir);
    let cert_pem = read_file(&cert_path)?;
    let key_pem = read_file(&key_path)?;
    let key =
        KeyPair::from_pem(&key_pem).map_err(crypto(&format!("parsing {}", key_path.display())))?;
    Issuer::from_ca_cert_pem(&cert_pem, key)
        .map_err(crypto(&format!("parsing {}", cert_path.display())))
}

/// Issue the hub's serving certificate for `names` (DNS names or IP addresses).
pub fn issue_server(
    dir: &Path,
    names: &[String],
    validity: Validity,
) -> Result<Vec<PathBuf>, PkiError> {
    let issuer = load_ca(dir)?;
    let mut params = CertificateParams::default();
    let first = names.first().ok_or(PkiError::InvalidName {
        name: String::new(),
        reason: "the hub needs at least one DNS name or IP address",
    })?;
    params
        .distinguished_name
        .push(DnType::CommonName, first.as_str());
    for name in names {
        let san = match name.parse::<IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(
                name.clone()
                    .try_into()
                    .map_err(crypto(&format!("DNS name {name:?}")))?,
            ),
        };
        params.subject_alt_names.push(san);
    }
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.not_before = validity.not_before;
    params.not_after = validity.not_after;
    let key = generate_key()?;
    let cert = params
        .signed_by(&key, &issuer)
        .map_err(crypto("signing the hub certificate"))?;
    let cert_path = dir.join("hub.pem");
    let key_path = dir.join("hub-key.pem");
    write_file(&cert_path, cert.pem().as_bytes(), 0o644)?;
    write_file(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
    Ok(vec![cert_path, key_path])
}

/// Issue a device client certificate with common name `cn_prefix + name`.
pub fn issue_device(
    dir: &Path,
    name: &str,
    cn_prefix: &str,
    validity: Validity,
) -> Result<Vec<PathBuf>, PkiError> {
    if name.is_empty() || name.contains(['/', '\\']) || name.starts_with('.') {
        return Err(PkiError::InvalidName {
            name: name.to_owned(),
            reason: "a device name must be non-empty, contain no path separators and not start with '.'",
        });
    }
    let issuer = load_ca(dir)?;
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, format!("{cn_prefix}{name}"));
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.not_before = validity.not_before;
    params.not_after = validity.not_after;
    let key = generate_key()?;
    let cert = params
        .signed_by(&key, &issuer)
        .map_err(crypto(&format!("signing the certificate of device {name}")))?;
    let devices = dir.join("devices");
    std::fs::create_dir_all(&devices).map_err(|source| PkiError::Io {
        path: devices.clone(),
        source,
    })?;
    let cert_path = devices.join(format!("{name}.pem"));
    let key_path = devices.join(format!("{name}-key.pem"));
    write_file(&cert_path, cert.pem().as_bytes(), 0o644)?;
    write_file(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
    Ok(vec![cert_path, key_path])
}

fn generate_key() -> Result<KeyPair, PkiError> {
    KeyPair::generate().map_err(crypto("generating a key"))
}

fn crypto(what: &str) -> impl FnOnce(rcgen::Error) -> PkiError + '_ {
    move |source| PkiError::Crypto {
        what: what.to_owned(),
        source,
    }
}

fn read_file(path: &Path) -> Result<String, PkiError> {
    std::fs::read_to_string(path).map_err(|source| PkiError::Io {
        path: path.to_owned(),
        source,
    })
}

/// Write atomically (see [`fleetlet_os::fs::write_atomic`]): the temp file is created with
/// `mode`, so a key is never briefly readable.
fn write_file(path: &Path, data: &[u8], mode: u32) -> Result<(), PkiError> {
    let io = |source| PkiError::Io {
        path: path.to_owned(),
        source,
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io)?;
    fleetlet_os::fs::write_atomic(path, data, mode).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls_pki_types::pem::PemObject;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn creates_ca_server_and_device_with_private_keys() {
        let dir = tempfile::tempdir().unwrap();
        let pki = dir.path();
        init(pki, false).unwrap();
        assert!(matches!(init(pki, false), Err(PkiError::Exists { .. })));
        issue_server(
            pki,
            &["localhost".into(), "127.0.0.1".into()],
            time_span(30),
        )
        .unwrap();
        issue_device(pki, "dev-1", "", time_span(30)).unwrap();
        for key in ["ca-key.pem", "hub-key.pem", "devices/dev-1-key.pem"] {
            let mode = std::fs::metadata(pki.join(key))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{key}");
        }
        let pem = std::fs::read(pki.join("devices/dev-1.pem")).unwrap();
        let der = rustls_pki_types::CertificateDer::pem_slice_iter(&pem)
            .next()
            .unwrap()
            .unwrap();
        let name = crate::link::identity_of(&der, crate::link::IdentitySource::CommonName, "");
        assert_eq!(name.unwrap(), "dev-1");
        assert!(matches!(
            issue_device(pki, "../x", "", time_span(1)),
            Err(PkiError::InvalidName { .. })
        ));
    }
}
