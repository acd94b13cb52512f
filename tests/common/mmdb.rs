//! A minimal MaxMind DB writer for tests: kurz reads GeoIP databases but never downloads one,
//! so the tests build their own small database in the real binary format.

use std::path::Path;

/// Writes a minimal IPv4 MaxMind DB (format 2.0, 24-bit records) mapping each network to a
/// record. `maxmind_style` picks `{"country": {"iso_code": CC}}` over `{"country_code": CC}`.
pub fn write_test_mmdb(path: &Path, networks: &[([u8; 4], u8, &str)], maxmind_style: bool) {
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
