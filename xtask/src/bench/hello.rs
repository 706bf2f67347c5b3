//! A real TLS 1.3 ClientHello, as the load generator's first bytes: what an SNI
//! router has to parse (HAProxy's `req.ssl_sni`, l4proxy's `sniff::tls`).

/// One TLS record holding a ClientHello for `server_name`, with the extensions
/// a TLS 1.3 client sends (so a parser walks a realistic extension list).
pub fn client_hello(server_name: &str) -> Vec<u8> {
    let mut extensions = Vec::new();
    // server_name: a list with one host_name entry.
    let name = server_name.as_bytes();
    let mut entry = vec![0u8]; // name type: host_name
    entry.extend(len16(name));
    entry.extend_from_slice(name);
    extension(&mut extensions, 0x0000, &vec16(&entry));
    // supported_groups: x25519, secp256r1.
    extension(&mut extensions, 0x000a, &vec16(&[0x00, 0x1d, 0x00, 0x17]));
    // signature_algorithms: ecdsa_secp256r1_sha256, rsa_pss_rsae_sha256, rsa_pkcs1_sha256.
    extension(
        &mut extensions,
        0x000d,
        &vec16(&[0x04, 0x03, 0x08, 0x04, 0x04, 0x01]),
    );
    // supported_versions: TLS 1.3, TLS 1.2 (a one-byte length).
    extension(&mut extensions, 0x002b, &[4, 0x03, 0x04, 0x03, 0x03]);
    // key_share: one x25519 share of 32 bytes.
    let mut share = vec![0x00, 0x1d, 0x00, 0x20];
    share.extend_from_slice(&[0x5a; 32]);
    extension(&mut extensions, 0x0033, &vec16(&share));

    let mut body = vec![0x03, 0x03]; // legacy_version: TLS 1.2
    body.extend_from_slice(&[0x42; 32]); // random
    body.push(32); // legacy_session_id
    body.extend_from_slice(&[0x17; 32]);
    // cipher_suites: TLS_AES_128_GCM_SHA256, TLS_AES_256_GCM_SHA384,
    // TLS_CHACHA20_POLY1305_SHA256, ECDHE-RSA-AES128-GCM-SHA256.
    body.extend(vec16(&[0x13, 0x01, 0x13, 0x02, 0x13, 0x03, 0xc0, 0x2f]));
    body.extend_from_slice(&[1, 0]); // compression: null only
    body.extend(vec16(&extensions));

    let mut handshake = vec![0x01]; // client_hello
    handshake.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    handshake.extend(body);

    let mut record = vec![0x16, 0x03, 0x01]; // handshake, legacy version TLS 1.0
    record.extend(vec16(&handshake));
    record
}

/// Bytes a complete first record takes, once its 5-byte header is in.
pub fn record_len(header: &[u8]) -> Option<usize> {
    (header.len() >= 5).then(|| 5 + usize::from(u16::from_be_bytes([header[3], header[4]])))
}

fn len16(data: &[u8]) -> [u8; 2] {
    u16::try_from(data.len())
        .expect("TLS vectors here are short")
        .to_be_bytes()
}

/// `data` with its 16-bit length in front.
fn vec16(data: &[u8]) -> Vec<u8> {
    let mut out = len16(data).to_vec();
    out.extend_from_slice(data);
    out
}

fn extension(out: &mut Vec<u8>, kind: u16, data: &[u8]) {
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend(vec16(data));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_nest_and_the_name_is_where_a_parser_looks() {
        let hello = client_hello("a.example.com");
        assert_eq!(record_len(&hello), Some(hello.len()), "record length");
        let handshake_len = u32::from_be_bytes([0, hello[6], hello[7], hello[8]]) as usize;
        assert_eq!(handshake_len, hello.len() - 9, "handshake length");
        // Past the type, versions, random, session id, ciphers, compression.
        let at = 9 + 2 + 32 + 1 + 32 + 2 + 8 + 2;
        let extensions_len = usize::from(u16::from_be_bytes([hello[at], hello[at + 1]]));
        assert_eq!(extensions_len, hello.len() - at - 2, "extensions length");
        // The first extension is server_name: type 0, lengths, host_name, name.
        let sni = &hello[at + 2..];
        assert_eq!(&sni[..2], &[0, 0]);
        assert_eq!(sni[6], 0, "host_name entry");
        assert_eq!(&sni[9..9 + 13], b"a.example.com");
    }
}
