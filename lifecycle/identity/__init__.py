"""Identity: principals hold keys, and every state-changing request is signed.

The model (meterkeys issue 11):

- A principal is a name, a role and a public key (EC P-256 or Ed25519). Its private key stays
  with the person: a PEM file (``signers.FileSigner``) or a smart card (``signers.Pkcs11Signer``).
  No parameter, environment variable or operating-system user names the actor: the signature
  does (``lifecycle.principals.authorize``).
- A request (``request.Request``) binds an action, the SHA-256 digest of its parameters, the
  principal, a nonce, a time and the installation, under a purpose string; the principal signs
  its canonical JSON. A request is accepted once (the nonce is recorded with the audit event
  that accepts it), while fresh, for those parameters only, in that installation only.
- Every principal row carries its own enrolment: the signed requests that enrolled it. A
  principal is trusted only when that enrolment verifies from the row alone, back to the trust
  anchor (``anchor``): a file beside the audit witness, outside the inventory, naming the root
  security officer (self-signed at ``hsm init``) and the one second security officer the root
  may enrol alone. Every other enrolment, and every disabling, needs two security officers
  (dual control). So a database writer, or a PIN holder who uses the HSM but holds no
  principal's private key, cannot plant a principal, change a role or swap a key unnoticed.

Modules: ``request`` (pure: canonical form, encoding), ``keys`` (public keys: allowed kinds,
fingerprints, verification), ``signers`` (private keys: file or smart card), ``anchor`` (the
trust anchor file), ``rules`` (pure checks: freshness, matching, dual control, enrolment chains).
"""
