//! Country of a click: from a GeoIP2/GeoLite2-style `.mmdb` file when one is configured (both
//! MaxMind's `{"country": {"iso_code"}}` records and ip-location-db's `{"country_code"}`), else
//! from a header set by a trusted proxy or CDN in front (e.g. `CF-IPCountry`), else "unknown".
//! Runs on the aggregator thread; never downloads anything.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use maxminddb::{path, Reader};

pub const UNKNOWN: &str = "unknown";

#[derive(Debug, thiserror::Error)]
pub enum GeoError {
    #[error("GeoIP database {path}: {detail}")]
    Open { path: PathBuf, detail: String },
}

/// Resolves client addresses to ISO 3166-1 alpha-2 country codes.
pub struct CountryResolver {
    database: Option<Reader<Vec<u8>>>,
}

impl CountryResolver {
    /// Without a database, countries come only from the trusted header.
    pub fn without_database() -> CountryResolver {
        CountryResolver { database: None }
    }

    /// Loads the `.mmdb` file at `path` into memory and checks that it can be read.
    pub fn open(path: &Path) -> Result<CountryResolver, GeoError> {
        let database = Reader::open_readfile(path).map_err(|error| GeoError::Open {
            path: path.to_owned(),
            detail: error.to_string(),
        })?;
        Ok(CountryResolver {
            database: Some(database),
        })
    }

    /// Whether addresses are looked up in a database (else only the header says).
    pub fn has_database(&self) -> bool {
        self.database.is_some()
    }

    /// The country of `client` (from the database) or, failing that, of the trusted header's
    /// value; "unknown" when neither says.
    pub fn country(&self, client: Option<IpAddr>, header: Option<&str>) -> String {
        let from_database = client.and_then(|ip| self.lookup(ip));
        from_database
            .or_else(|| header.and_then(country_code))
            .unwrap_or_else(|| UNKNOWN.to_owned())
    }

    fn lookup(&self, ip: IpAddr) -> Option<String> {
        let result = self.database.as_ref()?.lookup(ip).ok()?;
        let maxmind: Option<String> = result
            .decode_path(&path!["country", "iso_code"])
            .ok()
            .flatten();
        let code = match maxmind {
            Some(code) => code,
            None => result.decode_path(&path!["country_code"]).ok().flatten()?,
        };
        country_code(&code)
    }
}

/// A two-letter country code, upper-cased; `XX` and anything else is no country.
fn country_code(value: &str) -> Option<String> {
    let value = value.trim();
    let valid = value.len() == 2
        && value.bytes().all(|byte| byte.is_ascii_alphabetic())
        && !value.eq_ignore_ascii_case("xx");
    valid.then(|| value.to_ascii_uppercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_only_and_bad_values() {
        let resolver = CountryResolver::without_database();
        assert_eq!(resolver.country(None, Some("gb")), "GB");
        assert_eq!(resolver.country(None, Some("XX")), UNKNOWN);
        assert_eq!(resolver.country(None, Some("USA")), UNKNOWN);
        assert_eq!(resolver.country(None, Some("1!")), UNKNOWN);
    }

    #[test]
    fn a_bad_database_is_a_clear_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("broken.mmdb");
        std::fs::write(&path, b"not a database").expect("write");
        let error = CountryResolver::open(&path).err().expect("refused");
        assert!(error.to_string().contains("broken.mmdb"), "{error}");
    }
}
