# cython: language_level=3
"""Compiled public-key operations for DKIM, holding the GIL (engine._ext.pkey).

Owns two things only: an Ed25519 signature (RFC 8032 PureEdDSA, as RFC 8463 §3 uses it)
and a signature check (Ed25519, or RSA PKCS#1 v1.5 over a SHA-256 digest: RFC 6376 §3.3.1,
RFC 8017 §8.2), both through OpenSSL's libcrypto (the EVP interface of OpenSSL 3), the
signature through libsodium instead when the system has it (below: twice as fast).

Why it exists: ``cryptography`` releases the GIL inside every such call.  On ``ferry
serve``'s event loop that costs far more than the operation (a 35 µs Ed25519 signature cost
the loop ~220 µs, a 28 µs RSA verification ~250 µs: another thread takes the GIL and the
loop waits to get it back; benchmarks/README.md, issue 15), and handing the work to a
thread costs futures, a wake-up and the same GIL traffic.  These calls keep the GIL: the
operation costs the loop what it costs, tens of microseconds, and nothing else.  Only the
cheap operations belong here (an RSA *signature*, ~300 µs, stays in a thread).  Holding
the GIL also serialises the calls, so an object's OpenSSL context may be reused by every
thread that calls it (the executor's, when a large body is verified there).

The one exception is :class:`RsaSigner`, for that thread: RSA PKCS#1 v1.5 signatures of
SHA-256 digests (RFC 8017 §8.2.1, RFC 6376 §3.3.1), a whole list of digests in one
``nogil`` block.  ``cryptography`` releases the GIL once per signature, and on taking it
back the thread waits for the busy event loop to let go of it (up to the 5 ms switch
interval) once per message; here a batch of messages costs one release and one wait
(benchmarks/README.md, issue 15, seventh pass).  Its OpenSSL context is made per call,
so two threads may use one signer.

Its twin is engine/message/_pkey_py.py (``cryptography``): the same results for every
input (Ed25519 and RSA PKCS#1 v1.5 signatures are deterministic, so the same bytes).  It never parses key
formats beyond what OpenSSL does, never imports asyncio and never logs.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.stddef cimport size_t
from libc.stdlib cimport free, malloc
from posix.dlfcn cimport RTLD_LOCAL, RTLD_NOW, dlopen, dlsym

__all__ = ["HOLDS_GIL", "Ed25519Signer", "RsaSigner", "Verifier"]

#: The operations run holding the GIL (cheap to make on an event loop); all but
#: :meth:`RsaSigner.sign_digests`, which is for a thread.
HOLDS_GIL = True


# --- libsodium's Ed25519 signature, when the system has the library ----------------------
#
# An Ed25519 signature from libsodium (crypto_sign_detached) costs ~17 µs where OpenSSL
# 3.0's EVP_DigestSign costs ~39 µs on the same machine (benchmarks/README.md, issue 15,
# fourth pass), and RFC 8032 signatures are deterministic: the same key and data give the
# same 64 octets from either library (the twin tests compare them with cryptography's).
# The library is opened at import, not linked, so a system without it builds and runs
# this module on OpenSSL alone.  Only signing goes there: checking a signature stays with
# OpenSSL, whose acceptance rules (non-canonical encodings, small-order points) are the
# ones the verifier has always had.

ctypedef int (*_sodium_init_t)() noexcept nogil
ctypedef int (*_seed_keypair_t)(unsigned char* pk, unsigned char* sk,
                                const unsigned char* seed) noexcept nogil
ctypedef int (*_sign_detached_t)(unsigned char* sig, unsigned long long* siglen,
                                 const unsigned char* m, unsigned long long mlen,
                                 const unsigned char* sk) noexcept nogil

cdef _seed_keypair_t _seed_keypair = NULL
cdef _sign_detached_t _sign_detached = NULL


cdef bint _open_sodium():
    global _seed_keypair, _sign_detached
    cdef void* lib = NULL
    # The sonames of libsodium 1.0.18 (Debian 12, Ubuntu 24.04) and of 1.0.19 on.
    for name in (b"libsodium.so.23", b"libsodium.so.26", b"libsodium.so"):
        lib = dlopen(<const char*>name, RTLD_NOW | RTLD_LOCAL)
        if lib is not NULL:
            break
    if lib is NULL:
        return False
    cdef _sodium_init_t init = <_sodium_init_t>dlsym(lib, b"sodium_init")
    cdef _seed_keypair_t keypair = <_seed_keypair_t>dlsym(lib, b"crypto_sign_ed25519_seed_keypair")
    cdef _sign_detached_t detached = <_sign_detached_t>dlsym(lib, b"crypto_sign_ed25519_detached")
    # sodium_init: 0 done now, 1 done before, -1 failed.
    if init is NULL or keypair is NULL or detached is NULL or init() < 0:
        return False
    _seed_keypair, _sign_detached = keypair, detached
    return True


#: Which library makes Ed25519 signatures: "libsodium" when the system has it, else
#: "openssl" (tests/unit/test_pkey.py asserts the faster one is used where it is present).
ED25519_SIGNER = "libsodium" if _open_sodium() else "openssl"


cdef extern from "openssl/evp.h":
    ctypedef struct EVP_PKEY:
        pass
    ctypedef struct EVP_MD_CTX:
        pass
    ctypedef struct EVP_PKEY_CTX:
        pass
    ctypedef struct EVP_MD:
        pass
    ctypedef struct ENGINE:
        pass
    int EVP_PKEY_ED25519
    int EVP_PKEY_RSA
    EVP_PKEY* EVP_PKEY_new_raw_private_key(int type, ENGINE* e, const unsigned char* key,
                                           size_t keylen)
    EVP_PKEY* EVP_PKEY_new_raw_public_key(int type, ENGINE* e, const unsigned char* key,
                                          size_t keylen)
    void EVP_PKEY_free(EVP_PKEY* pkey)
    int EVP_PKEY_get_base_id(const EVP_PKEY* pkey)
    int EVP_PKEY_get_bits(const EVP_PKEY* pkey)
    int EVP_PKEY_get_size(const EVP_PKEY* pkey)
    EVP_PKEY* d2i_AutoPrivateKey(EVP_PKEY** a, const unsigned char** pp, long length)
    EVP_MD_CTX* EVP_MD_CTX_new()
    void EVP_MD_CTX_free(EVP_MD_CTX* ctx)
    int EVP_DigestSignInit(EVP_MD_CTX* ctx, EVP_PKEY_CTX** pctx, const EVP_MD* md, ENGINE* e,
                           EVP_PKEY* pkey)
    int EVP_DigestSign(EVP_MD_CTX* ctx, unsigned char* sigret, size_t* siglen,
                       const unsigned char* tbs, size_t tbslen)
    int EVP_DigestVerifyInit(EVP_MD_CTX* ctx, EVP_PKEY_CTX** pctx, const EVP_MD* md,
                             ENGINE* e, EVP_PKEY* pkey)
    int EVP_DigestVerify(EVP_MD_CTX* ctx, const unsigned char* sigret, size_t siglen,
                         const unsigned char* tbs, size_t tbslen)
    EVP_PKEY_CTX* EVP_PKEY_CTX_new(EVP_PKEY* pkey, ENGINE* e) nogil
    void EVP_PKEY_CTX_free(EVP_PKEY_CTX* ctx) nogil
    int EVP_PKEY_verify_init(EVP_PKEY_CTX* ctx)
    int EVP_PKEY_sign_init(EVP_PKEY_CTX* ctx) nogil
    int EVP_PKEY_sign(EVP_PKEY_CTX* ctx, unsigned char* sig, size_t* siglen,
                      const unsigned char* tbs, size_t tbslen) nogil
    int EVP_PKEY_verify(EVP_PKEY_CTX* ctx, const unsigned char* sig, size_t siglen,
                        const unsigned char* tbs, size_t tbslen)
    int EVP_PKEY_CTX_set_signature_md(EVP_PKEY_CTX* ctx, const EVP_MD* md) nogil
    const EVP_MD* EVP_sha256() nogil

cdef extern from "openssl/rsa.h":
    int RSA_PKCS1_PADDING
    int EVP_PKEY_CTX_set_rsa_padding(EVP_PKEY_CTX* ctx, int pad) nogil

cdef extern from "openssl/x509.h":
    EVP_PKEY* d2i_PUBKEY(EVP_PKEY** a, const unsigned char** pp, long length)

cdef extern from "openssl/err.h":
    void ERR_clear_error() nogil


cdef EVP_PKEY* _rsa_from_der(const unsigned char[::1] der, bint private):
    """The RSA key in ``der`` (a private key: PKCS#8 or PKCS#1; a public one:
    SubjectPublicKeyInfo), NULL when OpenSSL does not read it all as an RSA key."""
    cdef const unsigned char* p
    cdef EVP_PKEY* key
    if not der.shape[0]:
        return NULL
    p = &der[0]
    key = (d2i_AutoPrivateKey(NULL, &p, der.shape[0]) if private
           else d2i_PUBKEY(NULL, &p, der.shape[0]))
    if key is not NULL and (p != &der[0] + der.shape[0]
                            or EVP_PKEY_get_base_id(key) != EVP_PKEY_RSA):
        EVP_PKEY_free(key)  # trailing octets, or not an RSA key
        key = NULL
    return key


cdef class Ed25519Signer:
    """An Ed25519 private key (the 32 raw octets of RFC 8032 §5.1.5); ``sign(data)`` is
    the 64-octet signature of ``data``.  ValueError for a key that is not 32 octets."""

    cdef EVP_PKEY* _key
    cdef EVP_MD_CTX* _ctx
    #: libsodium's secret key (the seed, then the public key), when it signs.
    cdef unsigned char _sk[64]
    cdef bint _sodium

    def __cinit__(self, const unsigned char[::1] private not None):
        cdef unsigned char public[32]
        self._key = NULL
        self._ctx = NULL
        self._sodium = False
        if private.shape[0] != 32:
            raise ValueError("an Ed25519 private key is 32 octets")
        self._key = EVP_PKEY_new_raw_private_key(EVP_PKEY_ED25519, NULL, &private[0], 32)
        self._ctx = EVP_MD_CTX_new()
        if self._key is NULL or self._ctx is NULL:
            ERR_clear_error()
            raise ValueError("OpenSSL refused the Ed25519 key")
        if _seed_keypair is not NULL:
            self._sodium = _seed_keypair(public, self._sk, &private[0]) == 0

    def __dealloc__(self):
        cdef int i
        for i in range(64):
            (<volatile unsigned char*>self._sk)[i] = 0
        EVP_MD_CTX_free(self._ctx)
        EVP_PKEY_free(self._key)

    def sign(self, const unsigned char[::1] data not None) -> bytes:
        cdef unsigned char out[64]
        cdef size_t size = 64
        cdef unsigned long long length = 64
        cdef const unsigned char* p = &data[0] if data.shape[0] else <const unsigned char*>b""
        if self._sodium:
            if _sign_detached(out, &length, p, data.shape[0], self._sk) != 0:
                raise ValueError("libsodium could not make the Ed25519 signature")
            return out[:64]
        # One-shot EdDSA: the context is initialised again for every signature (RFC 8032
        # signs the whole message in one call; OpenSSL has no update for it).
        if (EVP_DigestSignInit(self._ctx, NULL, NULL, NULL, self._key) != 1
                or EVP_DigestSign(self._ctx, out, &size, p, data.shape[0]) != 1):
            ERR_clear_error()
            raise ValueError("OpenSSL could not make the Ed25519 signature")
        return out[:size]


cdef class Verifier:
    """A public key that checks signatures: ``kind`` "ed25519" (``public``: the 32 raw
    octets; ``verify`` checks PureEdDSA over ``data``) or "rsa" (``public``: DER
    SubjectPublicKeyInfo; ``verify`` checks PKCS#1 v1.5 of a SHA-256 ``data`` digest).
    ValueError for a key OpenSSL does not read as that kind."""

    cdef EVP_PKEY* _key
    cdef EVP_MD_CTX* _md
    cdef EVP_PKEY_CTX* _rsa
    cdef bint _ed25519
    cdef readonly str kind

    def __cinit__(self, str kind not None, const unsigned char[::1] public not None):
        self._key = NULL
        self._md = NULL
        self._rsa = NULL
        self.kind = kind
        if kind == "ed25519":
            self._ed25519 = True
            if public.shape[0] != 32:
                raise ValueError("an Ed25519 public key is 32 octets")
            self._key = EVP_PKEY_new_raw_public_key(EVP_PKEY_ED25519, NULL, &public[0], 32)
            self._md = EVP_MD_CTX_new()
            if self._md is NULL:
                raise MemoryError()
        elif kind == "rsa":
            self._ed25519 = False
            self._key = _rsa_from_der(public, False)
        else:
            raise ValueError(f"unknown key kind {kind!r}")
        if self._key is NULL:
            ERR_clear_error()
            raise ValueError(f"not an {kind} public key")
        if not self._ed25519:
            # RFC 8017 §8.2.2 with SHA-256 (RFC 6376 §3.3.1): set up once, used for every
            # check (OpenSSL 3 fetches the algorithm at each init: a few µs).
            self._rsa = EVP_PKEY_CTX_new(self._key, NULL)
            if (self._rsa is NULL or EVP_PKEY_verify_init(self._rsa) != 1
                    or EVP_PKEY_CTX_set_rsa_padding(self._rsa, RSA_PKCS1_PADDING) != 1
                    or EVP_PKEY_CTX_set_signature_md(self._rsa, EVP_sha256()) != 1):
                ERR_clear_error()
                raise ValueError("OpenSSL refused to check with the RSA key")

    def __dealloc__(self):
        EVP_PKEY_CTX_free(self._rsa)
        EVP_MD_CTX_free(self._md)
        EVP_PKEY_free(self._key)

    @property
    def bits(self) -> int:
        return EVP_PKEY_get_bits(self._key)

    def verify(self, const unsigned char[::1] signature not None,
               const unsigned char[::1] data not None) -> bool:
        cdef const unsigned char* s = (&signature[0] if signature.shape[0]
                                       else <const unsigned char*>b"")
        cdef const unsigned char* d = &data[0] if data.shape[0] else <const unsigned char*>b""
        cdef int ok
        if self._ed25519:
            ok = (EVP_DigestVerifyInit(self._md, NULL, NULL, NULL, self._key) == 1
                  and EVP_DigestVerify(self._md, s, signature.shape[0], d,
                                       data.shape[0]) == 1)
        else:
            ok = EVP_PKEY_verify(self._rsa, s, signature.shape[0], d, data.shape[0]) == 1
        if not ok:
            ERR_clear_error()  # a bad signature leaves errors queued for this thread
        return bool(ok)


cdef class RsaSigner:
    """An RSA private key (DER: PKCS#8 PrivateKeyInfo, or PKCS#1 RSAPrivateKey) that signs
    SHA-256 digests with PKCS#1 v1.5 (RFC 8017 §8.2.1, as RFC 6376 §3.3.1 has rsa-sha256
    use it).  ``sign_digests(digests)`` is the list of their signatures, with a ValueError
    in the place of a digest that is not 32 octets or that OpenSSL could not sign.
    ValueError for a key that is not an RSA private key."""

    cdef EVP_PKEY* _key

    def __cinit__(self, const unsigned char[::1] private not None):
        self._key = _rsa_from_der(private, True)
        if self._key is NULL:
            ERR_clear_error()
            raise ValueError("not an RSA private key")

    def __dealloc__(self):
        EVP_PKEY_free(self._key)

    @property
    def bits(self) -> int:
        return EVP_PKEY_get_bits(self._key)

    def sign_digests(self, digests) -> list:
        """Every digest's signature, made in one release of the GIL (see the module
        docstring): a batch of signatures waits for the GIL once, not once each."""
        cdef list items = [d if type(d) is bytes else bytes(d) for d in digests]
        cdef Py_ssize_t n = len(items), i
        cdef size_t size = EVP_PKEY_get_size(self._key)
        cdef size_t length
        cdef EVP_PKEY* key = self._key
        cdef EVP_PKEY_CTX* ctx = NULL
        cdef bint ready = False
        cdef bint failed = False
        if n == 0:
            return []
        # The signatures are written straight into new bytes objects (nothing else holds
        # them yet); the digests' buffers stay alive in ``items``.
        cdef list out = [PyBytes_FromStringAndSize(NULL, size) for _ in range(n)]
        cdef const unsigned char** tbs = <const unsigned char**>malloc(n * sizeof(void*))
        cdef unsigned char** sig = <unsigned char**>malloc(n * sizeof(void*))
        cdef unsigned char* done = <unsigned char*>malloc(n)
        if tbs is NULL or sig is NULL or done is NULL:
            free(tbs)
            free(sig)
            free(done)
            raise MemoryError()
        try:
            for i in range(n):
                done[i] = 0
                sig[i] = <unsigned char*>PyBytes_AS_STRING(out[i])
                tbs[i] = (<const unsigned char*>PyBytes_AS_STRING(items[i])
                          if len(<bytes>items[i]) == 32 else NULL)
            with nogil:
                # RFC 8017 §8.2.1 with SHA-256's DigestInfo (EMSA-PKCS1-v1_5, §9.2): the
                # padding and the digest's algorithm set once for the batch.
                ctx = EVP_PKEY_CTX_new(key, NULL)
                ready = (ctx is not NULL and EVP_PKEY_sign_init(ctx) == 1
                         and EVP_PKEY_CTX_set_rsa_padding(ctx, RSA_PKCS1_PADDING) == 1
                         and EVP_PKEY_CTX_set_signature_md(ctx, EVP_sha256()) == 1)
                for i in range(n):
                    if ready and tbs[i] is not NULL:
                        length = size
                        if EVP_PKEY_sign(ctx, sig[i], &length, tbs[i], 32) == 1 \
                                and length == size:
                            done[i] = 1
                    if not done[i]:
                        failed = True
                EVP_PKEY_CTX_free(ctx)
                if failed:
                    ERR_clear_error()  # this thread's queue: nothing left for the next call
            if not ready:
                raise ValueError("OpenSSL refused to sign with the RSA key")
            for i in range(n):
                if not done[i]:
                    out[i] = ValueError("a SHA-256 digest is 32 octets" if tbs[i] is NULL
                                        else "OpenSSL could not make the RSA signature")
            return out
        finally:
            free(tbs)
            free(sig)
            free(done)
