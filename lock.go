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

	//go:embed lua/warm.lua
	warmLua    string
	warmScript = redis.NewScript(warmLua)

	//go:embed lua/keep.lua
	keepLua    string
	keepScript = redis.NewScript(keepLua)
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

// scriptCall is one run of a lease script, built by the lease owner
// (leases): alone or in a pipeline with others (leases.run).
type scriptCall struct {
	s     *redis.Script
	keys  []string
	args  []any
	write bool // a write that must not be lost (a fill, a release, a set): the write budget
}

// leases is the lease owner: the one place that builds lease scripts'
// calls and sends them, each under the budget of its kind. Lease rounds
// (acquire, refresh) and renewals (extend) are on a reader's path and get
// the read budget; fills, releases and namespaced sets are writes that
// must not be lost and get the write budget. Built once in New.
type leases struct {
	g      *guarded
	ttl    time.Duration // Options.LeaseTTL
	genTTL time.Duration // the lifetime of a namespace's generation key
	format byte          // the codec's format byte, for lease entries
	hub    *hub          // the client's pub/sub; nil for none
	wake   string        // the wake channel fills and releases publish on; "" for none
}

// wakeArg is the channel a fill or release script publishes its wake
// message on: "" when the script must not (no pub/sub, or a sharded hub,
// where the script reports a contended lease and the Cache publishes).
func (l *leases) wakeArg() string {
	if l.hub == nil || l.hub.mode.Load() != modeClassic {
		return ""
	}
	return l.wake
}

// acquire is acquire.lua's call for op: take op.tok's lease on an absent
// key (or on the undecodable entry op.vw.replace names). In a tagged
// cache, tagGen is the digest of the key's tags' generations, which the
// lease carries and an entry must carry to count (see tags.go); nil
// otherwise.
func (l *leases) acquire(key, genKey string, tok envelope.Token, replace, tagGen []byte) scriptCall {
	fresh := newGen()
	return scriptCall{s: acquireScript, keys: entryKeys(key, genKey),
		args: []any{leaseEntry(tok, l.format), millis(l.ttl), replace, fresh[:], millis(l.genTTL), tagGen}}
}

// acquireReply reads acquire.lua's reply: whether the caller now holds the
// lease, the namespace generation the lease was taken under and, if the
// caller does not hold it, the entry found in its place.
func acquireReply(res []any, err error) (held bool, gen envelope.Gen, cur []byte, _ error) {
	if err != nil {
		return false, gen, nil, err
	}
	if len(res) < 2 {
		return false, gen, nil, fmt.Errorf("acquire: reply of %d elements", len(res))
	}
	g, _ := res[1].(string)
	gen = nsGen(g).gen
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

// refresh is refresh.lua's call: turn the value written under old into a
// refreshing entry held by tok (readers still serve its value).
// readRefreshing says old is a refreshing entry's token, read to take over
// its dead holder: a value under old is then that holder's fresh fill, not
// taken.
func (l *leases) refresh(key, genKey string, old, tok envelope.Token, readRefreshing bool) scriptCall {
	read := "0"
	if readRefreshing {
		read = "1"
	}
	return scriptCall{s: refreshScript, keys: entryKeys(key, genKey), args: []any{old[:], tok[:], millis(l.ttl), millis(l.genTTL), read}}
}

// fill is fill.lua's call: write entry for ttl if key still holds tok's
// lease (and, with genKey, if the namespace generation is still the
// entry's), and wake the lease's waiters: the message carries the lease's
// proof, so that they can trust it (envelope.LeaseToken).
func (l *leases) fill(key, genKey string, tok, proof envelope.Token, entry []byte, ttl time.Duration) scriptCall {
	return scriptCall{s: fillScript, keys: entryKeys(key, genKey), write: true,
		args: []any{tok[:], entry, millis(ttl), millis(l.genTTL), l.wakeArg(), proof[:]}}
}

// keep is keep.lua's call: turn tok's refreshing entry back into a value
// with entry's header (its payload unchanged) that lives for ttl.
func (l *leases) keep(key, genKey string, tok envelope.Token, entry []byte, ttl time.Duration) scriptCall {
	return scriptCall{s: keepScript, keys: entryKeys(key, genKey), write: true,
		args: []any{tok[:], entry[:envelope.GenOffset], millis(ttl), millis(l.genTTL)}}
}

// release is release.lua's call: delete tok's lease, or turn tok's
// refreshing entry back into a value that lives for keep more (keep ≤ 0
// deletes it), and wake the waiters to look again.
func (l *leases) release(key string, tok envelope.Token, keep time.Duration) scriptCall {
	ms := int64(0)
	if keep > 0 {
		ms = millis(keep)
	}
	return scriptCall{s: releaseScript, keys: []string{key}, args: []any{tok[:], ms, l.wakeArg()}, write: true}
}

// extend is extend.lua's call: renew tok's lease on key for another
// LeaseTTL.
func (l *leases) extend(key string, tok envelope.Token) scriptCall {
	return scriptCall{s: extendScript, keys: []string{key}, args: []any{tok[:], millis(l.ttl)}}
}

// set is set.lua's call: write entry stamped with the namespace's current
// generation.
func (l *leases) set(key, genKey string, entry []byte, ttl time.Duration) scriptCall {
	fresh := newGen()
	return scriptCall{s: setScript, keys: []string{key, genKey}, args: []any{entry, millis(ttl), fresh[:], millis(l.genTTL)}, write: true}
}

// warm writes entry under key for ttl unless a load in flight holds it
// (SetMany); genKey is the namespace's generation key, or "".
func (l *leases) warm(key, genKey string, entry []byte, ttl time.Duration) scriptCall {
	fresh := newGen()
	return scriptCall{s: warmScript, keys: entryKeys(key, genKey), args: []any{entry, millis(ttl), fresh[:], millis(l.genTTL)}, write: true}
}

// runOne sends one call, under the budget of its kind.
func (l *leases) runOne(ctx context.Context, sc scriptCall) *redis.Cmd {
	return l.run(ctx, []scriptCall{sc})[0]
}

// run sends the calls in one pipeline (one round trip per node), under the
// budget of their kind (the write budget if any is a write), and returns
// each call's reply. Scripts go by EVALSHA; any the server does not have
// yet (NOSCRIPT) are sent again by EVAL. Every script is safe to run
// twice, so this is safe however the first round went.
func (l *leases) run(ctx context.Context, calls []scriptCall) []*redis.Cmd {
	write := false
	for _, sc := range calls {
		write = write || sc.write
	}
	budget := func(n int) time.Duration {
		if write {
			return l.g.writeBudget(n)
		}
		return l.g.batchBudget(n)
	}
	if len(calls) == 1 { // one key (a Get): the script alone, no pipeline
		return []*redis.Cmd{l.g.runScript(ctx, budget(1), calls[0])}
	}
	cmds := make([]*redis.Cmd, len(calls))
	send := func(idx []int, byEval bool) {
		route := make([]string, len(idx))
		for j, i := range idx {
			route[j] = firstKey(calls[i].keys)
		}
		sent, err := l.g.pipe(ctx, budget(len(idx)), writes, route, func(p redis.Pipeliner, j int) redis.Cmder {
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
		call := c.leases.release(key, tok, keep)
		for pause := 10 * time.Millisecond; ; pause = min(2*pause, 200*time.Millisecond) {
			n, err := c.leases.runOne(ctx, call).Int64()
			if n == 2 || err == nil && c.leases.wakeArg() == "" {
				// Reported contended, or an earlier try's reply (which may
				// have said so) was lost: a key-only message sends any
				// waiters to look again, which costs them one read.
				c.wakeLater(key, nil, nil)
			}
			// Done, or out of time, or the breaker is open (Redis is down:
			// the lease expires by itself within LeaseTTL, as the retries
			// would have).
			if err != nil {
				c.ev.redisError(c.stop, "release", err) // counted (a skip only traced, and c.stop has no trace), not logged
			}
			if err == nil || ctx.Err() != nil || c.stop.Err() != nil || errors.Is(err, ErrRedisUnavailable) {
				return
			}
			if sleep(ctx, spread(pause)) != nil {
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
		calls[i] = c.leases.extend(op.key, op.tok)
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
			for i, cmd := range c.leases.run(ctx, calls) {
				if err := cmd.Err(); err != nil && ctx.Err() == nil {
					failed.add(calls[i].keys[0], err)
				}
			}
			failed.report(ctx, c, "extend")
		}
	}()
	return func() { cancel(); <-done }
}
