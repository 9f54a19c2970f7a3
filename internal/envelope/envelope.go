// Package envelope encodes the bytes stored under one cache key.
//
// An entry is a fixed 48-byte header followed by the codec's payload:
//
//	offset size field
//	0      1    magic 0xCA
//	1      1    format version (Version)
//	2      1    kind (Value, NotFound, Lease, Refreshing)
//	3      1    codec format byte
//	4      16   token: the lease token of a lease or refreshing entry, or
//	            the token of the write that stored a value or tombstone
//	20     8    soft expiry, Unix milliseconds (0: none)
//	28     4    load duration, milliseconds; in a Lease: nonzero once
//	            another caller waits for it, so its fill wakes the waiters;
//	            in a Refreshing entry: the refresh lease's deadline, Redis
//	            server time in milliseconds mod 2^32
//	32     8    namespace generation the entry was loaded under, or the
//	            digest of its tags' generations (zero outside namespaces
//	            and tags)
//	40     8    when the value or tombstone was written, Unix
//	            milliseconds by the writer's clock (0 in a lease); kept
//	            when a reload finds the value unchanged
//	48     ...  payload (codec bytes; empty for NotFound and Lease)
//
// The Lua scripts in the cacheaside package read the magic, version, kind,
// token and generation at these fixed offsets, and keep every byte from
// offset 32 on when they rewrite a header, so the layout is part of the
// format version. Version 1 ended its header at the generation, with no
// written-at field.
package envelope

import (
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
)

// Magic is the first byte of every entry.
const Magic byte = 0xCA

// Version is the format version this package writes and reads. A change to
// the header layout or the meaning of a field increments it.
const Version byte = 2

// HeaderSize is the length of the fixed header.
const HeaderSize = 48

// TokenSize is the length of a lease token.
const TokenSize = 16

// TokenOffset is where the token starts in the header.
const TokenOffset = 4

// GenOffset is where the namespace generation starts in the header.
const GenOffset = 32

// GenSize is the length of a namespace generation.
const GenSize = 8

// WrittenOffset is where the written-at time starts in the header.
const WrittenOffset = 40

// Kind says what an entry holds.
type Kind byte

const (
	// Value holds a cached value in the payload.
	Value Kind = 1
	// NotFound is a tombstone: the loader reported that the item does not exist.
	NotFound Kind = 2
	// Lease marks a load in progress: no value yet.
	Lease Kind = 3
	// Refreshing holds a value, like Value, while its holder loads a newer
	// one under the lease token in the header.
	Refreshing Kind = 4
)

func (k Kind) String() string {
	switch k {
	case Value:
		return "value"
	case NotFound:
		return "not-found"
	case Lease:
		return "lease"
	case Refreshing:
		return "refreshing"
	}
	return fmt.Sprintf("kind(%d)", byte(k))
}

// Token is a 128-bit random lease token.
type Token [TokenSize]byte

// LeaseToken returns the token a lease taken with the secret proof
// carries: the first 16 bytes of SHA-256(proof). The entry shows the token
// to anyone who can read the key; only the holder knows the proof, and its
// fill's wake message carries it, so a waiter can tell the holder's message
// from one forged by a client that read the token.
func LeaseToken(proof Token) Token {
	sum := sha256.Sum256(proof[:])
	var t Token
	copy(t[:], sum[:TokenSize])
	return t
}

// Gen is a namespace generation: 64 random bits, so a lost or evicted
// generation key never brings an old generation back.
type Gen [GenSize]byte

// Entry is a decoded header with its payload. Payload aliases the input of
// Decode; it is not copied.
type Entry struct {
	Kind       Kind
	Format     byte
	Token      Token
	SoftExpiry int64  // Unix ms; 0 means none
	LoadMillis uint32 // how long the load that produced this entry took
	Gen        Gen    // namespace generation, or tags' digest; zero outside namespaces and tags
	Written    int64  // Unix ms the value or tombstone was written; 0 in a lease
	Payload    []byte
}

// Errors returned by Decode. All of them mean "not an entry this code can
// read"; callers treat the key as a miss and overwrite it.
var (
	ErrShort      = errors.New("entry shorter than its header")
	ErrMagic      = errors.New("not a cacheaside entry (bad magic byte)")
	ErrVersion    = errors.New("unknown entry format version")
	ErrKind       = errors.New("unknown entry kind")
	ErrTrailing   = errors.New("payload on an entry kind that has none")
	ErrZeroToken  = errors.New("entry without a token")
	ErrNoEnvelope = errors.New("empty entry")
)

// Append encodes e onto dst and returns the extended slice.
func Append(dst []byte, e *Entry) []byte {
	var h [HeaderSize]byte
	h[0] = Magic
	h[1] = Version
	h[2] = byte(e.Kind)
	h[3] = e.Format
	copy(h[TokenOffset:TokenOffset+TokenSize], e.Token[:])
	binary.BigEndian.PutUint64(h[20:28], uint64(e.SoftExpiry))
	binary.BigEndian.PutUint32(h[28:32], e.LoadMillis)
	copy(h[GenOffset:GenOffset+GenSize], e.Gen[:])
	binary.BigEndian.PutUint64(h[WrittenOffset:HeaderSize], uint64(e.Written))
	dst = append(dst, h[:]...)
	return append(dst, e.Payload...)
}

// Encode returns a new slice holding e.
func Encode(e *Entry) []byte {
	return Append(make([]byte, 0, HeaderSize+len(e.Payload)), e)
}

// Decode parses b into e without copying the payload. It accepts only
// entries this version wrote; anything else is an error.
func Decode(b []byte, e *Entry) error {
	if len(b) == 0 {
		return ErrNoEnvelope
	}
	if b[0] != Magic {
		return ErrMagic
	}
	if len(b) < 2 {
		return ErrShort
	}
	if b[1] != Version {
		return fmt.Errorf("%w %d (this build reads %d)", ErrVersion, b[1], Version)
	}
	if len(b) < HeaderSize {
		return ErrShort
	}
	k := Kind(b[2])
	switch k {
	case Value, Refreshing:
	case NotFound, Lease:
		if len(b) != HeaderSize {
			return ErrTrailing
		}
	default:
		return fmt.Errorf("%w %d", ErrKind, b[2])
	}
	e.Kind = k
	e.Format = b[3]
	copy(e.Token[:], b[TokenOffset:TokenOffset+TokenSize])
	if e.Token == (Token{}) {
		return ErrZeroToken
	}
	e.SoftExpiry = int64(binary.BigEndian.Uint64(b[20:28]))
	e.LoadMillis = binary.BigEndian.Uint32(b[28:32])
	copy(e.Gen[:], b[GenOffset:GenOffset+GenSize])
	e.Written = int64(binary.BigEndian.Uint64(b[WrittenOffset:HeaderSize]))
	e.Payload = b[HeaderSize:]
	return nil
}
