"""What an examiner checks: journal signatures (attestation) and the HTML case report."""
