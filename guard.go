// The Redis guard: per-command budgets and the circuit breakers
// (breakers.go) in front of every command.

package cacheaside

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"net"
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
//   - circuit breakers (breakers.go; github.com/sony/gobreaker/v2), one
//     per node and direction: after BreakerFailures consecutive transport
//     failures or timeouts, that node's reads or writes skip Redis for
//     BreakerCooldown, then it is probed again, so a dead Redis adds almost
//     nothing to a Get;
//   - a policy for Redis being unavailable: fail open (call the loader,
//     at most MaxLoadsWhileDown at a time, so the database is shielded) or
//     fail closed (return ErrRedisUnavailable).
//
// Their settings, Degradation, are in options.go with the other options.

// guarded wraps the Redis client: the one way the cache sends a command.
// Each runs under the budget of its kind and through the circuit breaker
// of its node and direction. Lease scripts reach it only through the lease
// owner (leases, lock.go), which picks their budget.
type guarded struct {
	rdb     Redis
	adapt   *adaptive     // the read budget: Degradation.OpTimeout up to MaxOpTimeout (adapt.go)
	write   time.Duration // Degradation.WriteTimeout
	br      *breakers     // nil: no breaker (breakers.go)
	ev      *events       // counts commands the open breaker skips
	sockets bool          // the client puts a command's deadline on its socket: a socket timeout is the command's own deadline
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
	if errors.Is(caller.Err(), context.Canceled) || starved(err) {
		return errExcluded // the caller gave up, or this process was late: Redis may be fine
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

// cmdOp is one command the guard admitted (not a keyOp, which is a key
// on its way through a Get): the context to run it on, and what to do
// when it returns.
type cmdOp struct {
	g      *guarded
	caller context.Context
	ctx    context.Context
	cancel context.CancelFunc // nil for a deadline-only context
	report func(error)        // the breaker's; nil without one
	spend  *redisTime         // the Get's Redis time, charged at end; nil off the miss path
	start  time.Time          // when the command began
	budget time.Duration      // what the command was given
	sample bool               // its latency feeds the adaptive read budget (GET, MGET)
}

// Starvation. A command's deadline is a timer, and a timer fires only
// when this process gets the CPU. Throttled by a CPU quota, or on a host
// whose cores are busy, the process can be frozen for tens of
// milliseconds, and every command in flight then "times out" though Redis
// answered in time. Such a timeout is told from a slow Redis by when it is
// noticed: a timer that fires on time is noticed within a millisecond or
// two of its deadline, one that fires while the process is frozen only
// when it thaws. A timeout noticed more than lateBy(budget) after its
// deadline is this process's lateness (errStarved), not Redis's. Only
// the command's own deadline counts: a client without
// ContextTimeoutEnabled times its socket out at its ReadTimeout, long
// after the command's budget, and that is Redis failing.

// lateBy is how late past its deadline a timeout may be noticed and still
// count as Redis's: half the budget, and at least 10ms.
func lateBy(budget time.Duration) time.Duration { return max(budget/2, 10*time.Millisecond) }

// late wraps err in errStarved if it is the command's own deadline (the
// context's, or the socket's when sockets says the client put it there),
// noticed more than lateBy(budget) after deadline.
func late(err error, deadline time.Time, budget time.Duration, sockets bool) error {
	if err == nil || errors.Is(err, errStarved) || time.Since(deadline) <= lateBy(budget) {
		return err
	}
	var ne net.Error
	if !errors.Is(err, context.DeadlineExceeded) && !(sockets && errors.As(err, &ne) && ne.Timeout()) {
		return err
	}
	return fmt.Errorf("%w: %w", errStarved, err)
}

// isTimeout reports a deadline error: the context's, or the socket's.
func isTimeout(err error) bool {
	if errors.Is(err, context.DeadlineExceeded) {
		return true
	}
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// starved reports whether err is a starved timeout (see late).
func starved(err error) bool { return errors.Is(err, errStarved) }

// end releases the command's context, tells the breaker how it went, and
// returns err, marked if the command timed out only because this process
// was not scheduled in time (see late). The Get's Redis time is charged
// with what the command took, and not at all when it was starved: that
// time was this process's, not Redis's.
func (o cmdOp) end(err error) error {
	if err != nil && o.ctx != nil {
		if dl, ok := o.ctx.Deadline(); ok {
			err = late(err, dl, o.budget, o.g.sockets)
		}
	}
	if o.cancel != nil {
		o.cancel()
	}
	if o.spend != nil || o.sample {
		took := time.Since(o.start)
		if o.spend != nil && !starved(err) {
			o.spend.left.Add(-int64(took))
		}
		if o.sample {
			switch {
			case err == nil || errors.Is(err, redis.Nil):
				o.g.adapt.answered(took)
			case isTimeout(err) && !starved(err) && o.caller.Err() == nil:
				o.g.adapt.timedOut()
			}
		}
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
	return err
}

// begin admits one command of direction d on key ("" for a keyless
// command), or returns ErrRedisUnavailable if the breaker of key's node
// and d is open. light asks for the timer-free budget context (budget.go),
// which is used only while Redis is healthy; otherwise the command gets a
// context.WithTimeout of the caller's.
func (g *guarded) begin(ctx context.Context, budget time.Duration, light bool, d direction, key string) (cmdOp, error) {
	guard := g.br != nil && (light || ctx.Value(pastBreakerKey{}) == nil)
	if guard && g.br.route == nil { // one node: ask the breaker before building a context
		done, err := g.br.one[d].Allow()
		if err != nil {
			g.ev.redisSkipped()
			return cmdOp{g: g, caller: ctx}, errBreakerOpen
		}
		o, err := g.start(ctx, budget, light)
		if err != nil {
			done(errExcluded)
			return o, err
		}
		o.report = done
		return o, nil
	}
	o, err := g.start(ctx, budget, light)
	if err != nil || !guard {
		return o, err
	}
	done, err := g.br.get(o.ctx, d, key).Allow() // the lookup under the budget: a Cluster client's first slot map
	if err != nil {
		o.skip()
		return o, errBreakerOpen
	}
	o.report = done
	return o, nil
}

// skip gives up a command the breaker did not admit.
func (o cmdOp) skip() {
	if o.cancel != nil {
		o.cancel()
	}
	o.g.ev.redisSkipped()
	o.g.br.failed() // a Cluster's slot map may have moved the key to a live master
}

// start gives a command its budget: the context it runs on, bounded by
// budget, by the Get's Redis time left and by half of the caller's time.
func (g *guarded) start(ctx context.Context, budget time.Duration, light bool) (cmdOp, error) {
	o := cmdOp{g: g, caller: ctx}
	if !light { // the hit path's reads never carry a Redis-time account
		if t, _ := ctx.Value(redisTimeKey{}).(*redisTime); t != nil {
			left := time.Duration(t.left.Load())
			if left <= 0 {
				g.ev.redisSkipped()
				return o, errRedisTimeSpent
			}
			budget = min(budget, left)
			o.spend = t
		}
	}
	o.start = time.Now()
	// Leave the caller at least half of its remaining time for the loader:
	// a short request deadline must not be spent waiting on Redis alone.
	if dl, ok := ctx.Deadline(); ok {
		budget = max(min(budget, time.Until(dl)/2), time.Millisecond)
	}
	o.budget = budget
	if light && g.healthy.Load() {
		if err := ctx.Err(); err != nil {
			return o, err // the caller gave up: send nothing
		}
		o.ctx = newBudgetCtx(ctx, o.start.Add(budget))
	} else {
		o.ctx, o.cancel = context.WithTimeout(ctx, budget)
	}
	return o, nil
}

// readBudget is the budget of a read now (adapt.go).
func (g *guarded) readBudget() time.Duration { return g.adapt.budget() }

func (g *guarded) Get(ctx context.Context, key string) *redis.StringCmd {
	o, err := g.begin(ctx, g.readBudget(), true, reads, key)
	if err != nil {
		cmd := redis.NewStringCmd(ctx, "get", key)
		cmd.SetErr(err)
		return cmd
	}
	o.sample = true
	cmd := g.rdb.Get(o.ctx, key)
	endCmd(o, cmd)
	return cmd
}

func (g *guarded) MGet(ctx context.Context, keys ...string) *redis.SliceCmd {
	o, err := g.begin(ctx, g.readBudget(), true, reads, firstKey(keys))
	if err != nil {
		cmd := redis.NewSliceCmd(ctx, "mget")
		cmd.SetErr(err)
		return cmd
	}
	o.sample = true
	cmd := g.rdb.MGet(o.ctx, keys...)
	endCmd(o, cmd)
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
	endCmd(o, cmd)
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
	endCmd(o, cmd)
	return cmd
}

// batchBudget bounds a pipeline of n commands on a reader's path: one
// command's budget per 50 commands, up to bulkBudget.
func (g *guarded) batchBudget(n int) time.Duration {
	return min(g.readBudget()*time.Duration(1+n/50), g.bulkBudget())
}

// writeBudget bounds a write of n keys that must not be lost: the write
// budget, and as much again per 1,000 keys.
func (g *guarded) writeBudget(n int) time.Duration {
	return g.write * time.Duration(1+n/1000)
}

// bulkBudget bounds the commands of invalidations, which may carry
// thousands of keys and are not on a reader's path.
func (g *guarded) bulkBudget() time.Duration { return max(10*g.adapt.floor, time.Second) }

func (g *guarded) Scan(ctx context.Context, cursor uint64, match string, count int64) *redis.ScanCmd {
	o, err := g.begin(ctx, g.bulkBudget(), false, reads, "")
	if err != nil {
		cmd := redis.NewScanCmd(ctx, nil, "scan")
		cmd.SetErr(err)
		return cmd
	}
	cmd := g.rdb.Scan(o.ctx, cursor, match, count)
	endCmd(o, cmd)
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
	return cmds, o.end(err)
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
		done  func(error)
		first error
	}
	var tickets []*ticket           // by command (nil: not admitted); nil without breakers
	var byNode map[*breaker]*ticket // one admission per breaker
	if g.br != nil && ctx.Value(pastBreakerKey{}) == nil {
		tickets = make([]*ticket, len(keys))
		byNode = make(map[*breaker]*ticket, 1)
		for i, k := range keys {
			nb := g.br.get(o.ctx, d, k)
			t, seen := byNode[nb]
			if !seen {
				if done, aerr := nb.Allow(); aerr == nil {
					t = &ticket{done: done}
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
	if starved(o.end(first)) { // the whole pipeline was read late: mark each timeout
		for _, cmd := range cmds {
			if cmd != nil && cmd.Err() != nil && isTimeout(cmd.Err()) {
				cmd.SetErr(fmt.Errorf("%w: %w", errStarved, cmd.Err()))
			}
		}
		if isTimeout(err) {
			err = fmt.Errorf("%w: %w", errStarved, err)
		}
		for _, t := range tickets {
			if t != nil && t.first != nil && isTimeout(t.first) {
				t.first = errStarved
			}
		}
	}
	for _, t := range byNode {
		if t != nil {
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

// publish sends one message on channel under the budget: a PUBLISH
// through the breaker of keyless writes (a Cluster sends it to any node),
// or on a sharded hub an SPUBLISH through the breaker of the channel's
// node.
func (g *guarded) publish(ctx context.Context, h *hub, channel string, msg []byte) error {
	route := ""
	if h.mode.Load() == modeSharded {
		route = h.wireName(channel)
	}
	o, err := g.begin(ctx, g.readBudget(), false, writes, route)
	if err != nil {
		return err
	}
	return o.end(h.publish(o.ctx, channel, msg))
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
	endCmd(o, cmd)
	return cmd
}

// firstKey is the key that routes a command of keys to its node ("" for
// none).
func firstKey(keys []string) string {
	if len(keys) == 0 {
		return ""
	}
	return keys[0]
}

// endCmd ends o with cmd's outcome, marking cmd's error if it was starved.
func endCmd(o cmdOp, cmd redis.Cmder) {
	if err := cmd.Err(); err != nil {
		if e := o.end(err); e != err {
			cmd.SetErr(e)
		}
		return
	}
	o.end(nil)
}
