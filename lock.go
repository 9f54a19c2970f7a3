package cacheaside

import (
	"context"
	"crypto/rand"
	_ "embed"
	"fmt"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/seed-b4ec662f/cacheaside/internal/envelope"
)

// The lease protocol. A lease is not a second key: it is the entry itself,
// written with kind=lease and a fresh 128-bit token, and with a relative PX
// lifetime so Redis's own clock ends it if the holder dies. Every script
// reads the token at a fixed offset of the entry header (see
// internal/envelope) and acts only when it is the caller's, so a DEL or
// UNLINK of the key (Invalidate), a Set, or a takeover after expiry revokes
// the lease and the holder's late fill is refused. Scripts are safe to run
// twice with the same arguments, as go-redis does when it retries a command
// whose reply was lost.

var (
	//go:embed lua/acquire.lua
	acquireLua    string
	acquireScript = redis.NewScript(acquireLua)

	//go:embed lua/fill.lua
	fillLua    string
	fillScript = redis.NewScript(fillLua)

	//go:embed lua/release.lua
	releaseLua    string
	releaseScript = redis.NewScript(releaseLua)

	//go:embed lua/extend.lua
	extendLua    string
	extendScript = redis.NewScript(extendLua)
)

// newToken returns a fresh random lease token.
func newToken() envelope.Token {
	var t envelope.Token
	_, _ = rand.Read(t[:]) // crypto/rand.Read never returns an error (Go ≥ 1.24)
	return t
}

// leaseEntry encodes the lease-only entry for tok.
func leaseEntry(tok envelope.Token, format byte) []byte {
	return envelope.Encode(&envelope.Entry{Kind: envelope.Lease, Format: format, Token: tok})
}

func millis(d time.Duration) int64 { return max(int64(d/time.Millisecond), 1) }

// acquire runs acquire.lua. It reports whether the caller now holds the
// lease; if not, cur is the entry found in its place. replace is the token
// (or nil) of an undecodable entry the caller may overwrite.
func acquire(ctx context.Context, rdb Redis, key string, lease []byte, ttl time.Duration, replace []byte) (held bool, cur []byte, err error) {
	res, err := acquireScript.Run(ctx, rdb, []string{key}, lease, millis(ttl), replace).Slice()
	if err != nil {
		return false, nil, err
	}
	if len(res) == 0 {
		return false, nil, fmt.Errorf("acquire: empty reply")
	}
	if n, _ := res[0].(int64); n == 1 {
		return true, nil, nil
	}
	if len(res) != 2 {
		return false, nil, fmt.Errorf("acquire: reply of %d elements", len(res))
	}
	s, ok := res[1].(string)
	if !ok {
		return false, nil, fmt.Errorf("acquire: entry of type %T", res[1])
	}
	return false, []byte(s), nil
}

// fill runs fill.lua: write entry for ttl if key still holds tok's lease.
func fill(ctx context.Context, rdb Redis, key string, tok envelope.Token, entry []byte, ttl time.Duration) (bool, error) {
	n, err := fillScript.Run(ctx, rdb, []string{key}, tok[:], entry, millis(ttl)).Int64()
	return n == 1, err
}

// release runs release.lua: delete key if it still holds tok's lease.
func release(ctx context.Context, rdb Redis, key string, tok envelope.Token) (bool, error) {
	n, err := releaseScript.Run(ctx, rdb, []string{key}, tok[:]).Int64()
	return n == 1, err
}

// extend runs extend.lua: renew tok's lease on key for ttl.
func extend(ctx context.Context, rdb Redis, key string, tok envelope.Token, ttl time.Duration) (bool, error) {
	n, err := extendScript.Run(ctx, rdb, []string{key}, tok[:], millis(ttl)).Int64()
	return n == 1, err
}
