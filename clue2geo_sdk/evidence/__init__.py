"""What an examiner checks and hands on: journal signatures (attestation), RFC 3161 timestamps,
the KML/KMZ and CASE/UCO exports, and the HTML case report."""
