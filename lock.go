// The lease: what the lecture calls the rebuild lock ("SET lock:key NX EX",
// one request rebuilds, the rest wait), here a lease held in the entry
// itself: its scripts (lua/) and how they are sent, alone or pipelined.

package cacheaside

import (
	"context"
	"crypto/rand"
	_ "embed"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/seed-b4ec662f/cacheaside/internal/envelope"
)

// The lease protocol. A lease is not a second key: it is the entry itself,
// written with kind=lease (no value yet) or kind=refreshing (the old value
// stays readable) and a fresh 128-bit token, with a relative PX lifetime so
// Redis's own clock ends it if the holder dies. Every script reads the
// token at a fixed offset of the entry header (see internal/envelope) and
// acts only when it is the caller's, so a DEL or UNLINK of the key
// (Invalidate), a Set, or a takeover after expiry revokes the lease and the
// holder's late fill is refused. In a namespace the scripts also compare
// the generation stamped in the entry with the namespace's current one, so
// a bump revokes every lease in the namespace at once. Scripts are safe to
// run twice with the same arguments, as go-redis does when it retries a
// command whose reply was lost.

var (
	//go:embed lua/acquire.lua
	acquireLua    string
	acquireScript = redis.NewScript(acquireLua)

	//go:embed lua/fill.lua
	fillLua    string
	fillScript = redis.NewScript(fillLua)

	//go:embed lua/refresh.lua
	refreshLua    string
	refreshScript = redis.NewScript(refreshLua)

	//go:embed lua/release.lua
	releaseLua    string
	releaseScript = redis.NewScript(releaseLua)

	//go:embed lua/extend.lua
	extendLua    string
	extendScript = redis.NewScript(extendLua)

	//go:embed lua/set.lua
	setLua    string
	setScript = redis.NewScript(setLua)
)

// newToken returns a fresh random lease token.
func newToken() envelope.Token {
	var t envelope.Token
	_, _ = rand.Read(t[:]) // crypto/rand.Read never returns an error (Go ≥ 1.24)
	return t
}

// newLease returns a fresh lease token and the proof it is derived from
// (envelope.LeaseToken): the lease entry carries tok, and only a fill's
// wake message carries proof.
func newLease() (tok, proof envelope.Token) {
	proof = newToken()
	return envelope.LeaseToken(proof), proof
}

// newGen returns a fresh random namespace generation.
func newGen() envelope.Gen {
	var g envelope.Gen
	_, _ = rand.Read(g[:])
	return g
}

// leaseEntry encodes the lease-only entry for tok.
func leaseEntry(tok envelope.Token, format byte) []byte {
	return envelope.Encode(&envelope.Entry{Kind: envelope.Lease, Format: format, Token: tok})
}

func millis(d time.Duration) int64 { return max(int64(d/time.Millisecond), 1) }

// entryKeys returns the keys a script touches: the entry, and the
// namespace generation key when there is one.
func entryKeys(key, genKey string) []string {
	if genKey == "" {
		return []string{key}
	}
	return []string{key, genKey}
}

// scriptCall is one run of a lease script: alone (run) or in a pipeline
// with others (Cache.evalMany).
type scriptCall struct {
	s    *redis.Script
	keys []string
	args []any
}

func (sc scriptCall) run(ctx context.Context, rdb Redis) *redis.Cmd {
	return sc.s.Run(ctx, rdb, sc.keys, sc.args...)
}

// acquire runs acquire.lua. It reports whether the caller now holds the
// lease and the namespace generation the lease was taken under; if the
// caller does not hold it, cur is the entry found in its place. replace is
// the token (or nil) of an undecodable entry the caller may overwrite.
func acquire(ctx context.Context, rdb Redis, key, genKey string, lease []byte, ttl time.Duration, replace []byte, genTTL time.Duration) (held bool, gen envelope.Gen, cur []byte, err error) {
	return acquireReply(acquireCall(key, genKey, lease, ttl, replace, genTTL).run(ctx, rdb).Slice())
}

func acquireCall(key, genKey string, lease []byte, ttl time.Duration, replace []byte, genTTL time.Duration) scriptCall {
	fresh := newGen()
	return scriptCall{acquireScript, entryKeys(key, genKey), []any{lease, millis(ttl), replace, fresh[:], millis(genTTL)}}
}

func acquireReply(res []any, err error) (held bool, gen envelope.Gen, cur []byte, _ error) {
	if err != nil {
		return false, gen, nil, err
	}
	if len(res) < 2 {
		return false, gen, nil, fmt.Errorf("acquire: reply of %d elements", len(res))
	}
	if g, _ := res[1].(string); len(g) == envelope.GenSize {
		copy(gen[:], g)
	}
	if n, _ := res[0].(int64); n == 1 {
		return true, gen, nil, nil
	}
	if len(res) != 3 {
		return false, gen, nil, fmt.Errorf("acquire: reply of %d elements", len(res))
	}
	s, ok := res[2].(string)
	if !ok {
		return false, gen, nil, fmt.Errorf("acquire: entry of type %T", res[2])
	}
	return false, gen, []byte(s), nil
}

// fill runs fill.lua: write entry for ttl if key still holds tok's lease
// (and, with genKey, if the namespace generation is still the entry's).
func fill(ctx context.Context, rdb Redis, key, genKey string, tok envelope.Token, entry []byte, ttl, genTTL time.Duration) (bool, error) {
	n, err := fillCall(key, genKey, tok, entry, ttl, genTTL, wakeTo{}).run(ctx, rdb).Int64()
	return n == 1, err
}

// wakeTo says where a fill of a contended lease wakes its waiters: the
// wake channel ("" for none) and the lease's proof, which the message
// carries so that the waiters can trust it (envelope.LeaseToken).
type wakeTo struct {
	channel string
	proof   envelope.Token
}

// fillCall is fill.lua's call.
func fillCall(key, genKey string, tok envelope.Token, entry []byte, ttl, genTTL time.Duration, wake wakeTo) scriptCall {
	return scriptCall{fillScript, entryKeys(key, genKey), []any{tok[:], entry, millis(ttl), millis(genTTL), wake.channel, wake.proof[:]}}
}

// refreshLease runs refresh.lua: turn the value written under old into a
// refreshing entry held by tok.
func refreshLease(ctx context.Context, rdb Redis, key, genKey string, old, tok envelope.Token, ttl, genTTL time.Duration) (bool, error) {
	n, err := refreshCall(key, genKey, old, tok, ttl, genTTL).run(ctx, rdb).Int64()
	return n == 1, err
}

func refreshCall(key, genKey string, old, tok envelope.Token, ttl, genTTL time.Duration) scriptCall {
	return scriptCall{refreshScript, entryKeys(key, genKey), []any{old[:], tok[:], millis(ttl), millis(genTTL)}}
}

// release runs release.lua: delete tok's lease, or turn tok's refreshing
// entry back into a value that lives for keep more (keep ≤ 0 deletes it).
func release(ctx context.Context, rdb Redis, key string, tok envelope.Token, keep time.Duration) (bool, error) {
	n, err := releaseCall(key, tok, keep, "").run(ctx, rdb).Int64()
	return n == 1, err
}

// releaseCall is release.lua's call; wake as for fillCall.
func releaseCall(key string, tok envelope.Token, keep time.Duration, wake string) scriptCall {
	ms := int64(0)
	if keep > 0 {
		ms = millis(keep)
	}
	return scriptCall{releaseScript, []string{key}, []any{tok[:], ms, wake}}
}

// extend runs extend.lua: renew tok's lease on key for ttl.
func extend(ctx context.Context, rdb Redis, key string, tok envelope.Token, ttl time.Duration) (bool, error) {
	n, err := extendCall(key, tok, ttl).run(ctx, rdb).Int64()
	return n == 1, err
}

func extendCall(key string, tok envelope.Token, ttl time.Duration) scriptCall {
	return scriptCall{extendScript, []string{key}, []any{tok[:], millis(ttl)}}
}

// setInNamespaceCall is set.lua's call: write entry stamped with the
// namespace's current generation.
func setInNamespaceCall(key, genKey string, entry []byte, ttl, genTTL time.Duration) scriptCall {
	fresh := newGen()
	return scriptCall{setScript, []string{key, genKey}, []any{entry, millis(ttl), fresh[:], millis(genTTL)}}
}

// evalMany runs the script calls in one pipeline (one round trip per node)
// and returns each call's reply. Scripts go by EVALSHA; any the server
// does not have yet (NOSCRIPT) are sent again by EVAL. Every script is
// safe to run twice, so this is safe however the first round went.
//
// write says the calls are writes that must not be lost (fills, releases):
// they get the write budget; lease rounds and renewals get a read's.
func (c *Cache[T]) evalMany(ctx context.Context, write bool, calls []scriptCall) []*redis.Cmd {
	budget := c.guard.batchBudget
	if write {
		budget = c.guard.writeBudget
	}
	if len(calls) == 1 { // one key (a Get): the script alone, no pipeline
		return []*redis.Cmd{c.guard.runScript(ctx, budget(1), calls[0])}
	}
	cmds := make([]*redis.Cmd, len(calls))
	send := func(idx []int, byEval bool) {
		route := make([]string, len(idx))
		for j, i := range idx {
			route[j] = firstKey(calls[i].keys)
		}
		sent, err := c.guard.pipe(ctx, budget(len(idx)), writes, route, func(p redis.Pipeliner, j int) redis.Cmder {
			sc := calls[idx[j]]
			if byEval {
				return sc.s.Eval(ctx, p, sc.keys, sc.args...)
			}
			return sc.s.EvalSha(ctx, p, sc.keys, sc.args...)
		})
		for j, i := range idx {
			if cmd, ok := sent[j].(*redis.Cmd); ok {
				cmds[i] = cmd
			} else { // not sent
				cmds[i] = redis.NewCmd(ctx)
				cmds[i].SetErr(unsentErr(sent, err))
			}
		}
	}
	all := make([]int, len(calls))
	for i := range all {
		all[i] = i
	}
	send(all, false)
	var again []int
	for i, cmd := range cmds {
		if err := cmd.Err(); err != nil && strings.HasPrefix(err.Error(), "NOSCRIPT") {
			cmds[i] = nil
			again = append(again, i)
		}
	}
	if len(again) > 0 {
		send(again, true)
	}
	return cmds
}

// releaseLater drops tok's lease in the background, off the caller's path,
// under the write budget and with retries: a lease script whose reply was lost
// may have taken it, or a fill failed and other processes would otherwise
// wait for it to expire. keep is how long a value the script may have
// turned into a refreshing entry should live on once put back. Close
// waits for it.
func (c *Cache[T]) releaseLater(key string, tok envelope.Token, keep time.Duration) {
	if !c.enter() {
		return
	}
	go func() {
		defer c.wg.Done()
		// Retried (10ms, doubling to 200ms) for up to LeaseTTL, or once more
		// after Close: a lease left behind makes other processes wait for it
		// to expire.
		ctx, cancel := context.WithTimeout(context.WithoutCancel(c.stop), c.opts.LeaseTTL)
		defer cancel()
		call := releaseCall(key, tok, keep, c.wakeChannel())
		for pause := 10 * time.Millisecond; ; pause = min(2*pause, 200*time.Millisecond) {
			err := c.guard.runScript(ctx, c.guard.writeBudget(1), call).Err()
			// Done, or out of time, or the breaker is open (Redis is down:
			// the lease expires by itself within LeaseTTL, as the retries
			// would have).
			if err != nil {
				c.ev.redisError(c.stop, "release", err) // counted (a skip only traced, and c.stop has no trace), not logged
			}
			if err == nil || ctx.Err() != nil || c.stop.Err() != nil || errors.Is(err, ErrRedisUnavailable) {
				return
			}
			if sleep(ctx, jitter(pause)) != nil {
				return
			}
		}
	}()
}

// keepLeases renews the leases of ops every LeaseTTL/3 (one round trip
// each time) until the returned stop is called; stop waits for the
// renewing goroutine to end.
func (c *Cache[T]) keepLeases(ctx context.Context, ops []*keyOp[T]) (stop func()) {
	if h := c.hooks; h != nil && h.noExtend {
		return func() {}
	}
	calls := make([]scriptCall, len(ops))
	for i, op := range ops {
		calls[i] = extendCall(op.key, op.tok, c.opts.LeaseTTL)
	}
	// Renewals are the holder's obligation, not the caller's wait: they are
	// not charged to the Get's Redis time.
	ctx, cancel := context.WithCancel(withoutRedisTime(ctx))
	done := make(chan struct{})
	go func() {
		defer close(done)
		t := time.NewTicker(c.opts.LeaseTTL / 3)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
			var failed errorOnce
			for i, cmd := range c.evalMany(ctx, false, calls) {
				if err := cmd.Err(); err != nil && ctx.Err() == nil {
					failed.add(calls[i].keys[0], err)
				}
			}
			failed.report(ctx, c, "extend")
		}
	}()
	return func() { cancel(); <-done }
}
