// The Redis guard: per-command budgets, the circuit breakers (breakers.go)
// in front of every command, the cap on loads while Redis is down.

package cacheaside

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"strings"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"
)

// Degradation. The cache must never make the application slower or less
// available than no cache at all. Three things see to it:
//
//   - a budget: every Redis command runs under Degradation.OpTimeout (or the
//     caller's deadline, if sooner), so a slow or black-holed Redis costs a
//     Get at most that before it falls back to the loader;
//   - a circuit breaker (github.com/sony/gobreaker/v2): after
//     BreakerFailures consecutive transport failures or timeouts, Redis is
//     skipped entirely for BreakerCooldown, then probed again, so a dead
//     Redis adds almost nothing to a Get;
//   - a policy for Redis being unavailable: fail open (call the loader,
//     at most MaxLoadsWhileDown at a time, so the database is shielded) or
//     fail closed (return ErrRedisUnavailable).

// Degradation configures how a Cache behaves when Redis is slow or down
// (Options.Degradation). The zero value of each field means the default
// written beside it.
type Degradation struct {
	// RedisTimePerGet bounds the time one Get or GetMany spends on Redis
	// in all: its read, its lease rounds, its polls while another holder
	// loads, and its fill (not the loader's time, nor the pauses between
	// polls). Each command gets the smaller of OpTimeout and what is left;
	// once it is spent, the Get goes on without Redis, as if Redis were
	// down (the loader answers, uncached; FailClosed: ErrRedisUnavailable).
	// So a Redis that answers every command just under OpTimeout cannot
	// stack command after command on a miss. The worst case of a Get:
	//
	//	RedisTimePerGet + LoadTimeout (its load, or the one it shares)
	//	  + LoadTimeout + LeaseTTL while another process holds the lease
	//	  + LoadTimeout for a load slot while Redis is down and
	//	    MaxLoadsWhileDown loads run
	//
	// each of the last two terms only in that case. Default 4 × OpTimeout
	// (200ms); at least OpTimeout.
	RedisTimePerGet time.Duration

	// OpTimeout bounds every Redis command the cache sends, and a command
	// never gets more than half of what remains of the caller's deadline:
	// a slow or unreachable Redis costs a Get at most this (per command)
	// before it falls back. The SCANs of InvalidatePrefix get ten times as
	// long, at least 1s; writes that must not be lost get WriteTimeout.
	// Default 50ms; at least 1ms.
	OpTimeout time.Duration

	// BreakerFailures is how many consecutive Redis failures (transport
	// errors, timeouts, LOADING-style replies; not misses, not the caller's
	// own cancellation) open the circuit breaker. While it is open, Redis is
	// skipped entirely. Default 5.
	BreakerFailures int

	// BreakerCooldown is how long the breaker stays open before one probe
	// command is let through (half-open); success closes it. Default 1s.
	BreakerCooldown time.Duration

	// NoBreaker turns the circuit breaker off. Default false.
	NoBreaker bool

	// OnRedisDown says what Get does when Redis cannot be used: FailOpen
	// (call the loader; default) or FailClosed (return ErrRedisUnavailable).
	OnRedisDown RedisDownPolicy

	// MaxLoadsWhileDown caps the loads running at once, in this cache, that
	// bypass Redis because it failed, so a Redis outage cannot flood the
	// source. Past the cap the shared load waits up to LoadTimeout for a
	// slot (each caller still returns when its own context ends), or, with
	// FailFastWhenCapped, the Get returns ErrOverloaded at once. Default 64.
	MaxLoadsWhileDown int

	// FailFastWhenCapped: see MaxLoadsWhileDown. Default false.
	FailFastWhenCapped bool

	// WriteTimeout bounds each Redis write whose loss would leave a stale
	// entry behind or other processes waiting: Invalidate (one key or a
	// batch alike), each UNLINK batch of InvalidatePrefix,
	// InvalidateNamespace, Set, and a lease holder's fill and release. Default
	// 5 × OpTimeout (250ms), plus as much again per 1,000 keys of a batch.
	WriteTimeout time.Duration

	// RetryInvalidations is how long an invalidation that failed
	// (Invalidate, InvalidatePrefix, InvalidateNamespace, a failed Set) is
	// retried in the background; while it waits, this process's Gets of
	// the keys it covers load from the source instead of the cache (see
	// retry.go). The call still returns its error. At most 10,000 are kept;
	// more are dropped and counted. Default: the longest lifetime the cache
	// gives an entry (the policy's TTL plus its stale windows, or its
	// NegativeTTL, plus LeaseTTL), after which the stale entry is gone anyway.
	RetryInvalidations time.Duration

	// NoRetryInvalidations turns the retries (and the bypass of pending
	// keys) off: a failed invalidation's entries then live until their TTL
	// ends, in this process too. Default false.
	NoRetryInvalidations bool
}

// Defaults of Degradation, named after the fields they fill in.
const (
	DefaultOpTimeout         = 50 * time.Millisecond
	DefaultBreakerFailures   = 5
	DefaultBreakerCooldown   = time.Second
	DefaultMaxLoadsWhileDown = 64
)

// resolve validates d and returns it with every default filled in.
func (d Degradation) resolve() (Degradation, error) {
	invalid := func(format string, args ...any) (Degradation, error) {
		return Degradation{}, fmt.Errorf("%w: Degradation.%s", ErrInvalidOptions, fmt.Sprintf(format, args...))
	}
	switch {
	case d.OpTimeout < 0:
		return invalid("OpTimeout %v is negative", d.OpTimeout)
	case d.OpTimeout != 0 && d.OpTimeout < time.Millisecond:
		return invalid("OpTimeout %v is below 1ms", d.OpTimeout)
	case d.BreakerFailures < 0:
		return invalid("BreakerFailures %d is negative", d.BreakerFailures)
	case d.BreakerCooldown < 0:
		return invalid("BreakerCooldown %v is negative", d.BreakerCooldown)
	case d.OnRedisDown != FailOpen && d.OnRedisDown != FailClosed:
		return invalid("OnRedisDown %v is not FailOpen or FailClosed", d.OnRedisDown)
	case d.MaxLoadsWhileDown < 0:
		return invalid("MaxLoadsWhileDown %d is negative", d.MaxLoadsWhileDown)
	case d.RetryInvalidations < 0:
		return invalid("RetryInvalidations %v is negative", d.RetryInvalidations)
	case d.RedisTimePerGet < 0:
		return invalid("RedisTimePerGet %v is negative", d.RedisTimePerGet)
	case d.WriteTimeout < 0:
		return invalid("WriteTimeout %v is negative", d.WriteTimeout)
	case d.WriteTimeout != 0 && d.WriteTimeout < time.Millisecond:
		return invalid("WriteTimeout %v is below 1ms", d.WriteTimeout)
	}
	if d.OpTimeout == 0 {
		d.OpTimeout = DefaultOpTimeout
	}
	if d.BreakerFailures == 0 {
		d.BreakerFailures = DefaultBreakerFailures
	}
	if d.BreakerCooldown == 0 {
		d.BreakerCooldown = DefaultBreakerCooldown
	}
	if d.MaxLoadsWhileDown == 0 {
		d.MaxLoadsWhileDown = DefaultMaxLoadsWhileDown
	}
	if d.WriteTimeout == 0 {
		d.WriteTimeout = 5 * d.OpTimeout
	}
	if d.RedisTimePerGet == 0 {
		d.RedisTimePerGet = 4 * d.OpTimeout
	}
	if d.RedisTimePerGet < d.OpTimeout {
		return invalid("RedisTimePerGet %v is below OpTimeout %v", d.RedisTimePerGet, d.OpTimeout)
	}
	return d, nil
}

// RedisDownPolicy says what Get does when Redis cannot be used.
type RedisDownPolicy int

const (
	// FailOpen calls the loader and returns its value, uncached. Default.
	FailOpen RedisDownPolicy = iota
	// FailClosed returns an error matching ErrRedisUnavailable, within the
	// operation budget, without calling the loader.
	FailClosed
)

func (p RedisDownPolicy) String() string {
	switch p {
	case FailOpen:
		return "fail-open"
	case FailClosed:
		return "fail-closed"
	}
	return fmt.Sprintf("RedisDownPolicy(%d)", int(p))
}

// guarded wraps the Redis client: each command runs under the operation
// budget and through the circuit breaker.
type guarded struct {
	rdb     Redis
	budget  time.Duration // Degradation.OpTimeout
	write   time.Duration // Degradation.WriteTimeout
	br      *breakers     // nil: no breaker (breakers.go)
	ev      *events       // counts commands the open breaker skips
	healthy atomic.Bool   // the last command went through (false until one does)
}

// pastBreakerKey marks the context of the retry queue's commands
// (retry.go): they run in the background, off every caller's path, so they
// go to Redis even while a breaker is open, and a write stall's queued
// invalidations land as soon as Redis takes writes again rather than after
// the breaker's cooldown. Their outcome is not reported to the breaker.
type pastBreakerKey struct{}

func pastBreaker(ctx context.Context) context.Context {
	return context.WithValue(ctx, pastBreakerKey{}, true)
}

// transient server replies that mean "Redis cannot serve now".
var unavailablePrefixes = []string{"LOADING", "MASTERDOWN", "CLUSTERDOWN", "TRYAGAIN", "BUSY", "READONLY"}

// breakerErr classifies the outcome of one command for the breaker: nil
// for success (a reply, including a miss or an ordinary error reply),
// errExcluded for the caller's own cancellation, err for a transport
// failure, a timeout or an "unavailable" reply.
func breakerErr(caller context.Context, err error) error {
	if err == nil || errors.Is(err, redis.Nil) {
		return nil
	}
	if errors.Is(caller.Err(), context.Canceled) {
		return errExcluded // the caller gave up; Redis may be fine
	}
	var re redis.Error
	if errors.As(err, &re) {
		msg := re.Error()
		for _, p := range unavailablePrefixes {
			if strings.HasPrefix(msg, p) {
				return err
			}
		}
		return nil
	}
	return err
}

// op is one admitted command: the context to run it on, and what to do
// when it returns.
type op struct {
	g      *guarded
	caller context.Context
	ctx    context.Context
	cancel context.CancelFunc // nil for a deadline-only context
	report func(error)        // the breaker's; nil without one
	nb     *nodeBreaker       // the breaker reported to; nil without one
	spend  *redisTime         // the Get's Redis time, charged at end; nil off the miss path
	start  time.Time          // when the command began, with spend
}

// end releases the command's context and tells the breaker how it went.
func (o op) end(err error) {
	if o.cancel != nil {
		o.cancel()
	}
	if o.spend != nil {
		o.spend.left.Add(-int64(time.Since(o.start)))
	}
	berr := breakerErr(o.caller, err)
	if berr != errExcluded {
		o.g.healthy.Store(berr == nil)
	}
	if o.report != nil {
		o.report(berr)
		if berr != nil && berr != errExcluded {
			o.g.br.failed()
		}
	}
}

// begin admits one command of direction d on key ("" for a keyless
// command), or returns ErrRedisUnavailable if the breaker of key's node
// and d is open. light asks for the timer-free budget context (budget.go),
// which is used only while Redis is healthy; otherwise the command gets a
// context.WithTimeout of the caller's.
func (g *guarded) begin(ctx context.Context, budget time.Duration, light bool, d direction, key string) (op, error) {
	var nb *nodeBreaker
	if g.br != nil && (light || ctx.Value(pastBreakerKey{}) == nil) {
		if g.br.route == nil { // one node: ask the breaker before building a context
			nb = g.br.one[d]
			done, err := nb.cb.Allow()
			if err != nil {
				g.ev.redisSkipped()
				return op{g: g, caller: ctx}, errBreakerOpen
			}
			o, err := g.start(ctx, budget, light)
			if err != nil {
				done(errExcluded)
				return o, err
			}
			o.nb, o.report = nb, done
			return o, nil
		}
	}
	o, err := g.start(ctx, budget, light)
	if err != nil || g.br == nil || (!light && ctx.Value(pastBreakerKey{}) != nil) {
		return o, err
	}
	o.nb = g.br.get(o.ctx, d, key) // under the budget: a Cluster client's first slot map
	done, err := o.nb.cb.Allow()
	if err != nil {
		o.skip()
		return o, errBreakerOpen
	}
	o.report = done
	return o, nil
}

// skip gives up a command the breaker did not admit.
func (o op) skip() {
	if o.cancel != nil {
		o.cancel()
	}
	o.g.ev.redisSkipped()
	o.g.br.failed() // a Cluster's slot map may have moved the key to a live master
}

// start gives a command its budget: the context it runs on, bounded by
// budget, by the Get's Redis time left and by half of the caller's time.
func (g *guarded) start(ctx context.Context, budget time.Duration, light bool) (op, error) {
	o := op{g: g, caller: ctx}
	if !light { // the hit path's reads never carry a Redis-time account
		if t, _ := ctx.Value(redisTimeKey{}).(*redisTime); t != nil {
			left := time.Duration(t.left.Load())
			if left <= 0 {
				g.ev.redisSkipped()
				return o, errRedisTimeSpent
			}
			budget = min(budget, left)
			o.spend, o.start = t, time.Now()
		}
	}
	// Leave the caller at least half of its remaining time for the loader:
	// a short request deadline must not be spent waiting on Redis alone.
	if dl, ok := ctx.Deadline(); ok {
		budget = max(min(budget, time.Until(dl)/2), time.Millisecond)
	}
	if light && g.healthy.Load() {
		if err := ctx.Err(); err != nil {
			return o, err // the caller gave up: send nothing
		}
		o.ctx = newBudgetCtx(ctx, time.Now().Add(budget))
	} else {
		o.ctx, o.cancel = context.WithTimeout(ctx, budget)
	}
	return o, nil
}

func (g *guarded) Get(ctx context.Context, key string) *redis.StringCmd {
	o, err := g.begin(ctx, g.budget, true, reads, key)
	if err != nil {
		cmd := redis.NewStringCmd(ctx, "get", key)
		cmd.SetErr(err)
		return cmd
	}
	cmd := g.rdb.Get(o.ctx, key)
	o.end(cmd.Err())
	return cmd
}

func (g *guarded) MGet(ctx context.Context, keys ...string) *redis.SliceCmd {
	o, err := g.begin(ctx, g.budget, true, reads, firstKey(keys))
	if err != nil {
		cmd := redis.NewSliceCmd(ctx, "mget")
		cmd.SetErr(err)
		return cmd
	}
	cmd := g.rdb.MGet(o.ctx, keys...)
	o.end(cmd.Err())
	return cmd
}

func (g *guarded) Set(ctx context.Context, key string, value any, expiration time.Duration) *redis.StatusCmd {
	o, err := g.begin(ctx, g.writeBudget(1), false, writes, key) // Set and namespace bumps: writes that matter
	if err != nil {
		cmd := redis.NewStatusCmd(ctx, "set", key)
		cmd.SetErr(err)
		return cmd
	}
	cmd := g.rdb.Set(o.ctx, key, value, expiration)
	o.end(cmd.Err())
	return cmd
}

func (g *guarded) Unlink(ctx context.Context, keys ...string) *redis.IntCmd {
	o, err := g.begin(ctx, g.writeBudget(len(keys)), false, writes, firstKey(keys))
	if err != nil {
		cmd := redis.NewIntCmd(ctx, "unlink")
		cmd.SetErr(err)
		return cmd
	}
	cmd := g.rdb.Unlink(o.ctx, keys...)
	o.end(cmd.Err())
	return cmd
}

// batchBudget bounds a pipeline of n commands on a reader's path: one
// command's budget per 50 commands, up to bulkBudget.
func (g *guarded) batchBudget(n int) time.Duration {
	return min(g.budget*time.Duration(1+n/50), g.bulkBudget())
}

// writeBudget bounds a write of n keys that must not be lost: the write
// budget, and as much again per 1,000 keys.
func (g *guarded) writeBudget(n int) time.Duration {
	return g.write * time.Duration(1+n/1000)
}

// bulkBudget bounds the commands of invalidations, which may carry
// thousands of keys and are not on a reader's path.
func (g *guarded) bulkBudget() time.Duration { return max(10*g.budget, time.Second) }

func (g *guarded) Scan(ctx context.Context, cursor uint64, match string, count int64) *redis.ScanCmd {
	o, err := g.begin(ctx, g.bulkBudget(), false, reads, "")
	if err != nil {
		cmd := redis.NewScanCmd(ctx, nil, "scan")
		cmd.SetErr(err)
		return cmd
	}
	cmd := g.rdb.Scan(o.ctx, cursor, match, count)
	o.end(cmd.Err())
	return cmd
}

// Pipelined is used by InvalidatePrefix for its UNLINK batches (up to
// scanBatch keys): writes that must not be lost.
func (g *guarded) Pipelined(ctx context.Context, fn func(redis.Pipeliner) error) ([]redis.Cmder, error) {
	o, err := g.begin(ctx, g.writeBudget(scanBatch), false, writes, "")
	if err != nil {
		return nil, err
	}
	cmds, err := g.rdb.Pipelined(o.ctx, fn)
	o.end(err)
	return cmds, err
}

// pipe runs a pipeline of len(keys) commands of direction d under
// budget: add(p, i) adds command i, which keys[i] routes. Each command
// goes through the breaker of its node: the commands whose breaker is open
// are not sent (nil in the result), and each breaker that let commands
// through hears the first error among them other than a miss (a pipeline
// of GETs reports redis.Nil for any absent key). The returned error is
// go-redis's, or errBreakerOpen when no command was sent.
func (g *guarded) pipe(ctx context.Context, budget time.Duration, d direction, keys []string, add func(p redis.Pipeliner, i int) redis.Cmder) ([]redis.Cmder, error) {
	o, err := g.start(ctx, budget, false)
	if err != nil {
		return make([]redis.Cmder, len(keys)), err
	}
	type ticket struct {
		nb    *nodeBreaker
		done  func(error)
		first error
	}
	var tickets []*ticket // by command; nil without breakers
	if g.br != nil && ctx.Value(pastBreakerKey{}) == nil {
		tickets = make([]*ticket, len(keys))
		byNode := make(map[*nodeBreaker]*ticket, 1)
		for i, k := range keys {
			nb := g.br.get(o.ctx, d, k)
			t, seen := byNode[nb]
			if !seen {
				if done, aerr := nb.cb.Allow(); aerr == nil {
					t = &ticket{nb: nb, done: done}
				}
				byNode[nb] = t
			}
			tickets[i] = t
		}
	}
	cmds := make([]redis.Cmder, len(keys))
	admitted := len(keys)
	for _, t := range tickets {
		if t == nil {
			admitted--
		}
	}
	switch {
	case admitted == 0:
		o.skip()
		return cmds, errBreakerOpen
	case admitted < len(keys): // sent to the other nodes
		g.ev.redisSkipped()
		g.br.failed()
	}
	_, err = g.rdb.Pipelined(o.ctx, func(p redis.Pipeliner) error {
		for i := range keys {
			if tickets == nil || tickets[i] != nil {
				cmds[i] = add(p, i)
			}
		}
		return nil
	})
	var first error
	for i, cmd := range cmds {
		if cmd == nil {
			continue
		}
		if e := cmd.Err(); e != nil && !errors.Is(e, redis.Nil) {
			first = cmp.Or(first, e)
			if tickets != nil && tickets[i].first == nil {
				tickets[i].first = e
			}
		}
	}
	if first == nil && err != nil && !errors.Is(err, redis.Nil) {
		first = err
	}
	o.end(first)
	reported := make(map[*ticket]bool)
	for _, t := range tickets {
		if t != nil && !reported[t] {
			reported[t] = true
			berr := breakerErr(ctx, t.first)
			t.done(berr)
			if berr != nil && berr != errExcluded {
				g.br.failed()
			}
		}
	}
	return cmds, err
}

// unsentErr is the error of a command pipe did not send: the open breaker
// of its node when others were sent, else what stopped the pipeline.
func unsentErr(cmds []redis.Cmder, err error) error {
	for _, cmd := range cmds {
		if cmd != nil {
			return errBreakerOpen
		}
	}
	return cmp.Or(err, errBreakerOpen)
}

// publish sends one PUBLISH under the budget and through the breaker of
// keyless writes (a Cluster sends it to any node).
func (g *guarded) publish(ctx context.Context, bus Bus, channel string, msg []byte) error {
	o, err := g.begin(ctx, g.budget, false, writes, "")
	if err != nil {
		return err
	}
	err = bus.Publish(o.ctx, channel, msg).Err()
	o.end(err)
	return err
}

func (g *guarded) script(ctx context.Context, keys []string, run func(context.Context) *redis.Cmd) *redis.Cmd {
	o, err := g.begin(ctx, g.budget, false, writes, firstKey(keys))
	if err != nil {
		cmd := redis.NewCmd(ctx)
		cmd.SetErr(err)
		return cmd
	}
	cmd := run(o.ctx)
	o.end(cmd.Err())
	return cmd
}

// runScript runs one lease script under budget, through the breaker: by
// EVALSHA, and by EVAL if the server does not have it yet.
func (g *guarded) runScript(ctx context.Context, budget time.Duration, sc scriptCall) *redis.Cmd {
	o, err := g.begin(ctx, budget, false, writes, firstKey(sc.keys))
	if err != nil {
		cmd := redis.NewCmd(ctx)
		cmd.SetErr(err)
		return cmd
	}
	cmd := sc.s.Run(o.ctx, g.rdb, sc.keys, sc.args...)
	o.end(cmd.Err())
	return cmd
}

func (g *guarded) Eval(ctx context.Context, script string, keys []string, args ...any) *redis.Cmd {
	return g.script(ctx, keys, func(c context.Context) *redis.Cmd { return g.rdb.Eval(c, script, keys, args...) })
}

func (g *guarded) EvalSha(ctx context.Context, sha1 string, keys []string, args ...any) *redis.Cmd {
	return g.script(ctx, keys, func(c context.Context) *redis.Cmd { return g.rdb.EvalSha(c, sha1, keys, args...) })
}

func (g *guarded) EvalRO(ctx context.Context, script string, keys []string, args ...any) *redis.Cmd {
	return g.script(ctx, keys, func(c context.Context) *redis.Cmd { return g.rdb.EvalRO(c, script, keys, args...) })
}

func (g *guarded) EvalShaRO(ctx context.Context, sha1 string, keys []string, args ...any) *redis.Cmd {
	return g.script(ctx, keys, func(c context.Context) *redis.Cmd { return g.rdb.EvalShaRO(c, sha1, keys, args...) })
}

func (g *guarded) ScriptExists(ctx context.Context, hashes ...string) *redis.BoolSliceCmd {
	return g.rdb.ScriptExists(ctx, hashes...)
}

func (g *guarded) ScriptLoad(ctx context.Context, script string) *redis.StringCmd {
	return g.rdb.ScriptLoad(ctx, script)
}

var _ Redis = (*guarded)(nil)

// firstKey is the key that routes a command of keys to its node ("" for
// none).
func firstKey(keys []string) string {
	if len(keys) == 0 {
		return ""
	}
	return keys[0]
}

// loadSlot takes one of the MaxLoadsWhileDown slots for a load that
// bypasses Redis, waiting on ctx or failing fast with ErrOverloaded as the
// options say. The returned function gives the slot back.
func (c *Cache[T]) loadSlot(ctx context.Context) (func(), error) {
	select {
	case c.loadSlots <- struct{}{}:
		return func() { <-c.loadSlots }, nil
	default:
	}
	if c.opts.Degradation.FailFastWhenCapped {
		c.ev.overloaded(ctx)
		return nil, ErrOverloaded
	}
	select {
	case c.loadSlots <- struct{}{}:
		return func() { <-c.loadSlots }, nil
	case <-ctx.Done():
		c.ev.overloaded(ctx)
		return nil, fmt.Errorf("%w: %w", ErrOverloaded, ctx.Err())
	}
}
