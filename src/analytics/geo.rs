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
pub(crate) mod tests {
    use super::*;

    /// Writes a minimal IPv4 MaxMind DB (format 2.0, 24-bit records) mapping each network to a
    /// record. `maxmind_style` picks `{"country": {"iso_code": CC}}` over `{"country_code": CC}`.
    pub(crate) fn write_test_mmdb(
        path: &Path,
        networks: &[([u8; 4], u8, &str)],
        maxmind_style: bool,
    ) {
        #[derive(Clone, Copy)]
        enum Record {
            Empty,
            Node(u32),
            Data(u32),
        }
        let mut nodes: Vec<[Record; 2]> = vec![[Record::Empty, Record::Empty]];
        let mut data = Vec::new();
        for (address, prefix_len, country) in networks {
            let offset = data.len() as u32;
            encode_country(&mut data, country, maxmind_style);
            let bits = u32::from_be_bytes(*address);
            let mut node = 0usize;
            for depth in 0..*prefix_len {
                let bit = ((bits >> (31 - depth)) & 1) as usize;
                if depth + 1 == *prefix_len {
                    nodes[node][bit] = Record::Data(offset);
                } else {
                    node = match nodes[node][bit] {
                        Record::Node(next) => next as usize,
                        _ => {
                            nodes.push([Record::Empty, Record::Empty]);
                            let next = nodes.len() - 1;
                            nodes[node][bit] = Record::Node(next as u32);
                            next
                        }
                    };
                }
            }
        }
        let node_count = nodes.len() as u32;
        let mut file = Vec::new();
        for node in &nodes {
            for record in node {
                let value = match record {
                    Record::Empty => node_count,
                    Record::Node(index) => *index,
                    Record::Data(offset) => node_count + 16 + offset,
                };
                file.extend_from_slice(&value.to_be_bytes()[1..]);
            }
        }
        file.extend_from_slice(&[0u8; 16]);
        file.extend_from_slice(&data);
        file.extend_from_slice(b"\xAB\xCD\xEFMaxMind.com");
        let mut metadata = Vec::new();
        map_header(&mut metadata, 9);
        string(&mut metadata, "binary_format_major_version");
        uint(&mut metadata, 5, 2);
        string(&mut metadata, "binary_format_minor_version");
        uint(&mut metadata, 5, 0);
        string(&mut metadata, "build_epoch");
        metadata.extend_from_slice(&[0x08, 0x02, 0, 0, 0, 0, 0x65, 0x00, 0x00, 0x00]);
        string(&mut metadata, "database_type");
        string(&mut metadata, "kurz-test-country");
        string(&mut metadata, "description");
        map_header(&mut metadata, 1);
        string(&mut metadata, "en");
        string(&mut metadata, "kurz test database");
        string(&mut metadata, "ip_version");
        uint(&mut metadata, 5, 4);
        string(&mut metadata, "languages");
        metadata.extend_from_slice(&[0x01, 0x04]);
        string(&mut metadata, "en");
        string(&mut metadata, "node_count");
        uint(&mut metadata, 6, node_count);
        string(&mut metadata, "record_size");
        uint(&mut metadata, 5, 24);
        file.extend_from_slice(&metadata);
        std::fs::write(path, file).expect("write test mmdb");
    }

    fn encode_country(data: &mut Vec<u8>, country: &str, maxmind_style: bool) {
        map_header(data, 1);
        if maxmind_style {
            string(data, "country");
            map_header(data, 1);
            string(data, "iso_code");
        } else {
            string(data, "country_code");
        }
        string(data, country);
    }

    fn map_header(out: &mut Vec<u8>, pairs: u8) {
        out.push((7 << 5) | pairs);
    }

    fn string(out: &mut Vec<u8>, text: &str) {
        assert!(text.len() < 29);
        out.push((2 << 5) | text.len() as u8);
        out.extend_from_slice(text.as_bytes());
    }

    /// A uint16 (type 5, 2 bytes) or uint32 (type 6, 4 bytes), big-endian.
    fn uint(out: &mut Vec<u8>, kind: u8, value: u32) {
        let bytes = if kind == 5 { 2 } else { 4 };
        out.push((kind << 5) | bytes as u8);
        out.extend_from_slice(&value.to_be_bytes()[4 - bytes..]);
    }

    #[test]
    fn database_then_header_then_unknown() {
        let dir = tempfile::tempdir().expect("tempdir");
        for maxmind_style in [true, false] {
            let path = dir.path().join(format!("countries-{maxmind_style}.mmdb"));
            write_test_mmdb(
                &path,
                &[([8, 8, 8, 0], 24, "US"), ([193, 99, 144, 0], 24, "de")],
                maxmind_style,
            );
            let resolver = CountryResolver::open(&path).expect("open test mmdb");
            let ip = |text: &str| text.parse::<IpAddr>().ok();
            assert_eq!(resolver.country(ip("8.8.8.8"), None), "US");
            assert_eq!(resolver.country(ip("193.99.144.80"), Some("FR")), "DE");
            assert_eq!(resolver.country(ip("127.0.0.1"), Some("fr")), "FR");
            assert_eq!(resolver.country(ip("127.0.0.1"), None), UNKNOWN);
            assert_eq!(resolver.country(ip("::1"), None), UNKNOWN);
        }
    }

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
