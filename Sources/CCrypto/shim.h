// OpenSSL's libcrypto (libssl-dev, 3.x): AES-256-GCM (EVP_CIPHER) and HKDF (EVP_KDF), which seal
// the data plane's gradient frames (SqueezeTransport's DataPlaneSeal). Only EVP calls: no crypto of our own.
#include <openssl/evp.h>
#include <openssl/kdf.h>
#include <openssl/core_names.h>
#include <openssl/params.h>
#include <openssl/rand.h>
#include <openssl/err.h>
