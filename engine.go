// The miss engine: the one implementation of the lease protocol. Get
// drives it with one key, GetMany with many; each key is a keyOp, and a
// run takes leases, waits for other holders, loads, fills or releases,
// falls back to a stale value, and loads without Redis when Redis fails.

package cacheaside

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"runtime/debug"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/seed-b4ec662f/cacheaside/internal/envelope"
	"github.com/seed-b4ec662f/cacheaside/internal/flight"
)

// keyOp is one key on its way through a Get or a GetMany: its first read,
// its in-process flight and, for the flight's leader, its lease.
type keyOp[T any] struct {
	key  string
	vk   verKeys // its version keys: its namespace's generation key, or its tags'
	idx  int     // position in the door's id list (GetMany); 0 for Get
	snap localSnap

	// the first read (GetMany reads every key at once)
	b     []byte
	gv    genView
	rerr  error
	spent time.Duration // Redis time the door spent before the engine (RedisTimePerGet)

	vw       view[T] // what the last read or lease script showed
	down     bool    // Redis failed on the first read: load without it
	fallback T       // newest value seen inside its stale-if-error window
	staleOK  bool    // fallback is set
	// staleRound is the flight's latest lease round, if it found fallback
	// in Redis (0: it did not, or only the first read did), which vouches
	// for it at the soft load timeout to the Gets joined before that round
	// (see joined), and to those whose reads show the entry it found. A
	// later round that found something else (a lease taken over a deleted
	// entry: an invalidation came between) resets it.
	staleRound uint64

	// the in-process flight
	start   uint64 // flights begun before the first read (see joined)
	attempt int    // 1 for a Get that starts over (see joined)
	seen    flightSeen
	trusted bool
	call    *flight.Call[answer[T]] // nil for a background refresh
	leader  bool
	fs      *flightState
	round   uint64      // the flight's round the key's answer would rest on (see joined)
	shared  *sharedRead // the read this Get queued and others share: released once its flight answered (shared.go)

	// the lease (leader only)
	tok    envelope.Token
	proof  envelope.Token // tok's proof, for the wake message (newLease)
	gen    envelope.Gen
	held   bool
	done   bool
	noWait bool // the next lease round follows at once, without a wait (see leaseRound)
	late   int  // lease rounds whose reply this process read late (errStarved), retried
	unsure bool // a lease round timed out since the last answered one: it may have taken the lease

	// the outcome when no flight carries it (call == nil): a background
	// refresh, or a load that bypasses the cache
	res T
	err error
}

// see records a view of the key; a value inside its stale-if-error window
// becomes the fallback for a reload that fails.
func (op *keyOp[T]) see(vw view[T]) {
	op.vw = vw
	if vw.state == stReload && vw.staleOK {
		op.fallback, op.staleOK = vw.v, true
	}
}

// reload reports whether the key holds a value due for reload, whose
// lease is taken in place (refresh.lua) so the value can be served if the
// reload fails: a plain value, or one being refreshed, whose holder may
// have died (refresh.lua takes it over only past the lease's deadline).
func (op *keyOp[T]) reload() bool {
	return op.vw.state == stReload && (op.vw.e.Kind == envelope.Value || op.vw.e.Kind == envelope.Refreshing)
}

// keep is how long the value may live on if its reload fails.
func (op *keyOp[T]) keep(c *Cache[T]) time.Duration {
	if op.reload() {
		return c.keepOnFailure(&op.vw.e)
	}
	return 0
}

// missRun is one run of the engine over the keys one flight leader holds.
type missRun[T any] struct {
	c   *Cache[T]
	ctx context.Context // detached from the caller's cancellation; Close cancels it
	src source[T]
	ops []*keyOp[T]
	mu  sync.Mutex // finish: the loads without Redis run beside the fills

	began time.Time // the soft load timeout of its waits counts from it (soft.go)

	panicked error // the panic settleAll recovered, as a *PanicError
}

// detach gives the run its context: the caller's values without its
// cancellation, cancelled by Close. The caller defers cancel and stop.
func (r *missRun[T]) detach(parent context.Context) (cancel context.CancelFunc, stop func() bool) {
	ctx, cancel := context.WithCancel(context.WithoutCancel(parent))
	r.ctx = ctx
	return cancel, context.AfterFunc(r.c.stop, cancel)
}

// start runs the engine for the flights ops lead, on a goroutine of the
// cache's: a caller that gives up does not stop it, Close does.
func (c *Cache[T]) start(parent context.Context, ops []*keyOp[T], src source[T]) {
	r := &missRun[T]{c: c, src: src, ops: ops}
	if !c.enter() {
		for _, op := range ops {
			r.finish(op, answer[T]{}, ErrClosed)
		}
		return
	}
	go r.run(parent)
}

// run takes the leases in rounds: one round of lease scripts for every key
// still open (one pipeline), then, together, one loader call for the keys
// it holds (filled in one pipeline) and one for the keys Redis failed on
// (not cached). Keys another process holds are waited for, then tried
// again, so each round makes at most one loader call of each kind. Every
// flight it leads ends, whatever happens.
func (r *missRun[T]) run(parent context.Context) {
	c := r.c
	defer c.wg.Done()
	r.began = time.Now()
	cancel, stop := r.detach(parent)
	defer cancel()
	defer stop()
	var spent time.Duration
	for _, op := range r.ops {
		spent = max(spent, op.spent)
	}
	r.ctx = withRedisTime(r.ctx, c.opts.Degradation.RedisTimePerGet-spent)
	ctx := r.ctx
	w := c.newWaiter()
	defer w.end()
	defer r.settleAll()

	var down, open []*keyOp[T]
	for _, op := range r.ops {
		op.tok, op.proof = newLease()
		if op.down {
			op.round = op.fs.observe() // the loader reads the source now, with no entry to vouch for it
			down = append(down, op)
		} else {
			open = append(open, op)
		}
	}
	for {
		var held []*keyOp[T]
		if len(open) > 0 {
			var failed []*keyOp[T]
			held, open, failed = r.leaseRound(open)
			down = append(down, failed...)
		}
		for _, op := range r.ops {
			op.fs.begin()
		}
		switch {
		case len(down) > 0 && len(held) > 0:
			var wg sync.WaitGroup
			d := down
			wg.Go(func() { r.loadDown(d) })
			r.loadAndFill(held)
			wg.Wait()
		case len(down) > 0:
			r.loadDown(down)
		case len(held) > 0:
			r.loadAndFill(held)
		}
		down = nil
		if len(open) == 0 {
			return
		}
		now := true
		for _, op := range open {
			now = now && op.noWait
			op.noWait = false
		}
		if now {
			continue // nothing to wait for: an entry to overwrite or a value to refresh in place
		}
		keys := make([]string, len(open))
		for i, op := range open {
			keys[i] = op.key
		}
		wctx, wcancel := r.softWait(ctx, open)
		err := w.wait(wctx, keys)
		wcancel()
		if err != nil && ctx.Err() == nil && wctx.Err() != nil {
			// The soft load timeout: answer the keys that have an old
			// value at hand, and go on waiting for the rest.
			if open = r.softTimedOut(open); len(open) == 0 {
				return
			}
			err = nil
			continue
		}
		if err == nil {
			if open = r.delivered(open, w.delivered()); len(open) == 0 {
				return
			}
		}
		switch {
		case errors.Is(err, errWaitedOut):
			// The holders neither filled nor let their leases lapse in the
			// time a load may take: answer from the source.
			down, open = open, nil
			for _, op := range down {
				r.releaseUnsure(op)
			}
			r.loadDown(down)
			return
		case err != nil:
			for _, op := range open {
				r.releaseUnsure(op)
				r.fail(op, err)
			}
			return
		}
	}
}

// delivered ends the flights whose fills the wake channel delivered (as
// the next lease round would have found them) and returns the ops still
// open. got maps keys to what their fills published; a key without an
// entry (a released lease, a large value), or whose message does not carry
// the proof of the lease the run waits for (wait.go), stays open for the
// next round.
func (r *missRun[T]) delivered(open []*keyOp[T], got map[string]wakeMsg) []*keyOp[T] {
	if len(got) == 0 {
		return open
	}
	c := r.c
	now := c.opts.Clock()
	rest := open[:0]
	for _, op := range open {
		// Only the fill of the lease this run waits for answers it, proved
		// by the lease's proof. Pub/sub can deliver a message late: one from
		// an earlier fill, published before this Get began, may carry a
		// value invalidated since; and anyone may publish.
		m := got[op.key]
		if op.vw.e.Kind != envelope.Lease || !m.answers(op.vw.e.Token) {
			rest = append(rest, op)
			continue
		}
		vw := c.classify(r.ctx, op.key, m.entry, genView{versioned: op.vk.versioned(), known: true, gen: op.gen}, now)
		if vw.e.Token != op.vw.e.Token || !r.answered(op, vw, 0) {
			rest = append(rest, op) // another lease's fill, not for this generation, or not what we can serve: look again
			continue
		}
		r.releaseUnsure(op) // a round that timed out may have taken the lease after this fill
	}
	return rest
}

// answered ends op's flight with what the key was found to hold (by a
// lease round, or a fill's wake-up message), if that is an answer: a
// fresh or stale value, or "not found". The entry's token is published
// for the Gets that may join (see flightSeen.joinable); round is the
// flight's round that found it (0 for a wake message; see joined).
func (r *missRun[T]) answered(op *keyOp[T], vw view[T], round uint64) bool {
	if vw.e.Token != (envelope.Token{}) {
		t := vw.e.Token
		op.fs.tok.Store(&t)
	}
	switch vw.state {
	case stFresh:
		r.finish(op, answer[T]{v: vw.v, tok: vw.e.Token, round: round}, nil)
	case stStale:
		r.c.ev.staleServed(r.ctx)
		r.finish(op, answer[T]{v: vw.v, tok: vw.e.Token, round: round}, nil)
	case stNotFound:
		r.finish(op, answer[T]{tok: vw.e.Token, round: round}, ErrNotFound)
	default:
		return false
	}
	return true
}

// releaseUnsure releases op's lease in the background if a lease round of
// op's that timed out may have taken it (the holder's had lapsed) and none
// answered since: others would wait for it to expire.
func (r *missRun[T]) releaseUnsure(op *keyOp[T]) {
	if op.unsure {
		op.unsure = false
		r.c.releaseLater(op.key, op.tok, op.keep(r.c))
	}
}

// settleAll ends every flight the run leads that is still open, after a
// panic (in a codec, a hook, a Recorder) or a bug: the callers get an
// error, held leases are released, and the process goes on.
func (r *missRun[T]) settleAll() {
	var err error = errNoAnswer
	if p := recover(); p != nil {
		err = panicIn("a codec, hook or Recorder", p, debug.Stack())
		r.panicked = err
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, op := range r.ops {
		if !op.done {
			if op.held || op.unsure {
				r.c.releaseLater(op.key, op.tok, op.keep(r.c))
			}
			r.finishLocked(op, answer[T]{}, err)
		}
	}
}

// tagRound makes, before a lease round, the generations of the tags of
// the ops whose read found none (a tag never invalidated, or whose
// generation key expired or was evicted): their leases carry the digest of
// the generations (tags.go). It returns, per op, the error that kept its
// tags from having generations.
func (r *missRun[T]) tagRound(ops []*keyOp[T]) []error {
	errs := make([]error, len(ops))
	var (
		need []int
		vks  []verKeys
	)
	for i, op := range ops {
		if len(op.vk.tags) > 0 && !op.reload() && !op.gv.known {
			need = append(need, i)
			vks = append(vks, op.vk)
		}
	}
	if len(need) == 0 {
		return errs
	}
	gvs, gerrs := r.c.tagGens(r.ctx, vks)
	for j, i := range need {
		if errs[i] = gerrs[j]; errs[i] == nil {
			ops[i].gv = gvs[j]
		}
	}
	return errs
}

// vouching is the round an answer of op's flight may rest on (see joined):
// round, except in a tagged cache, where no lease script or fill checks
// the tags, so no round vouches for an answer (tags.go).
func (c *Cache[T]) vouching(op *keyOp[T], round uint64) uint64 {
	if len(op.vk.tags) > 0 {
		return 0
	}
	return round
}

// tagsMoved reads the tags' generations a lease round read beside op's
// lease script, and reports whether they moved from those the script
// went by: the digest acquire.lua compared entries with, or the one
// stamped in the value refresh.lua took. A round that went by old
// generations saw nothing a Get begun after the invalidation may rely on
// (a lease of a load that read the old row looks current to it), so the
// round is done again with the new ones (op.gv). The round trip is the
// same: the reads go in the lease round's pipeline.
func (r *missRun[T]) tagsMoved(op *keyOp[T], cmds []*redis.Cmd) (bool, error) {
	gv, err := tagReplies(cmds)
	if err != nil {
		return false, err
	}
	went := op.gv.gen
	if op.reload() {
		went = op.vw.e.Gen
	}
	op.gv = gv
	return gv.gen != went, nil
}

// tagGen is the digest acquire.lua stamps op's lease with in a tagged
// cache (the generation its read found, or tagRound made), nil otherwise.
func (op *keyOp[T]) tagGen() []byte {
	if len(op.vk.tags) == 0 {
		return nil
	}
	return op.gv.gen[:]
}

// leaseRound sends the lease scripts of ops in one round trip: refresh.lua
// for a value due for reload, acquire.lua otherwise. It ends the flights
// whose key turned out to hold an answer, and returns the ops it now holds
// leases for, those still being loaded elsewhere, and those Redis failed
// on (to load without Redis).
func (r *missRun[T]) leaseRound(ops []*keyOp[T]) (held, open, failed []*keyOp[T]) {
	c := r.c
	pre := r.tagRound(ops)
	calls := make([]scriptCall, 0, len(ops))
	tagAt := make([]int, len(ops)) // where op's tag checks start in calls (tagged caches)
	for i, op := range ops {
		op.round = op.fs.observe()
		op.staleRound = 0 // set again below if this round finds the old value in Redis
		switch {
		case pre[i] != nil:
			continue
		case op.reload():
			op.gen = op.vw.e.Gen
			calls = append(calls, c.leases.refresh(op.key, op.vk.ns, op.vw.e.Token, op.tok, op.vw.e.Kind == envelope.Refreshing))
		default:
			calls = append(calls, c.leases.acquire(op.key, op.vk.ns, op.tok, op.vw.replace, op.tagGen()))
		}
		// The tags' generations again, in the same round trip: see
		// tagsMoved.
		tagAt[i] = len(calls)
		calls = append(calls, c.tagCalls(op.vk.tags)...)
	}
	var cmds []*redis.Cmd
	if len(calls) > 0 {
		cmds = c.leases.run(r.ctx, calls)
	}
	var acquireFailed, refreshFailed errorOnce
	now := c.opts.Clock()
	for i, op := range ops {
		var (
			ok  bool
			cur []byte
			err error
		)
		reload := op.reload()
		switch {
		case pre[i] != nil:
			err = pre[i] // its tags' generations could not be made: as if acquire.lua had failed
		case reload:
			var n int64
			n, err = cmds[tagAt[i]-1].Int64()
			ok = n == 1
		default:
			ok, op.gen, cur, err = acquireReply(cmds[tagAt[i]-1].Slice())
		}
		if err == nil && len(op.vk.tags) > 0 {
			var moved bool
			if moved, err = r.tagsMoved(op, cmds[tagAt[i]:tagAt[i]+len(op.vk.tags)]); moved {
				// A lease this round took is stamped with generations
				// already gone: dead to every reader, and the next round's
				// acquire.lua overwrites it (same token, new stamp).
				op.vw = view[T]{}
				op.noWait = true
				open = append(open, op)
				continue
			}
		}
		if err == nil {
			op.unsure = false
		}
		switch {
		case err != nil:
			if cerr := r.ctx.Err(); cerr != nil {
				r.releaseUnsure(op)
				r.fail(op, cerr)
				continue
			}
			if reload {
				refreshFailed.add(op.key, err)
			} else {
				acquireFailed.add(op.key, err)
			}
			if starved(err) && op.late < maxLate {
				// Read late by this process: the script may have run, and
				// running it again with the same token is safe (it reports
				// the lease taken), so the round is sent again at once
				// rather than the key loaded without Redis.
				op.late++
				op.noWait, op.unsure = true, true
				open = append(open, op)
				continue
			}
			if isTimeout(err) && !starved(err) && op.vw.e.Kind == envelope.Lease && !errors.Is(err, ErrRedisUnavailable) {
				// Another caller held the lease when Redis last answered:
				// a round that timed out since is no sign that Redis is
				// down, and loading now would be a second load. Keep
				// waiting for the holder, with the same token (acquire.lua
				// reports a lease this caller took meanwhile), within the
				// wait's bound and RedisTimePerGet; a refused connection,
				// an open breaker or spent Redis time ends the wait.
				op.unsure = true
				open = append(open, op)
				continue
			}
			if !errors.Is(err, ErrRedisUnavailable) || op.unsure { // not sent (breaker, Redis time spent): nothing to release, unless an earlier round may have taken it
				c.releaseLater(op.key, op.tok, op.keep(c)) // the script may have run, its reply lost
			}
			if c.opts.Degradation.OnRedisDown == FailClosed {
				r.fail(op, unavailable(err))
				continue
			}
			failed = append(failed, op)
		case ok:
			op.held = true
			if reload && op.staleOK {
				op.staleRound = op.round // refresh.lua took the lease only over the entry holding fallback
				if c.opts.SoftLoadTimeout > 0 && op.call != nil {
					op.fs.stale.Store(true) // before holding: a Get that sees holding sees this
				}
			}
			tok := op.tok
			op.fs.tok.Store(&tok)
			op.fs.holding.Store(true)
			held = append(held, op)
		case reload:
			// The value changed since it was read: look again, by acquire.
			op.vw = view[T]{}
			op.noWait = true
			open = append(open, op)
		default:
			vw := inFlight(r.src.per, c.classify(r.ctx, op.key, cur, genView{versioned: op.vk.versioned(), known: true, gen: op.gen}, now))
			if !r.answered(op, vw, op.round) {
				// Being loaded elsewhere (wait), undecodable (replace
				// names it: overwrite it now), or a value due for reload
				// (refresh it now).
				op.see(vw)
				if vw.state == stReload && vw.staleOK {
					op.staleRound = op.round
				}
				op.noWait = vw.state == stMiss || op.reload() && vw.e.Kind == envelope.Value
				open = append(open, op)
			}
		}
	}
	acquireFailed.report(r.ctx, c, "acquire")
	refreshFailed.report(r.ctx, c, "refresh")
	return held, open, failed
}

// maxLate bounds the lease rounds of one key sent again because their
// replies were read late (errStarved); after that the key is loaded
// without Redis, as after any failure. A frozen process's rounds are
// late once per freeze, and a CPU quota's freezes come every period (100ms
// by default): 8 covers a Get that waits through a 50ms load and more.
const maxLate = 8

// fail ends op's flight with err, or with the fallback value when err is a
// failure to reload a value still inside its stale-if-error window. The
// cancellation Close causes becomes ErrClosed.
func (r *missRun[T]) fail(op *keyOp[T], err error) {
	err = r.c.closedErr(err)
	if op.staleOK && !errors.Is(err, ErrNotFound) && !errors.Is(err, ErrClosed) {
		r.c.ev.staleIfError(r.ctx)
		r.finish(op, answer[T]{v: op.fallback}, nil)
		return
	}
	r.finish(op, answer[T]{}, err)
}

// finish ends the flight op leads with a (or records the outcome of a
// background refresh), once.
func (r *missRun[T]) finish(op *keyOp[T], a answer[T], err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.finishLocked(op, a, err)
}

func (r *missRun[T]) finishLocked(op *keyOp[T], a answer[T], err error) {
	if op.done { // settleAll ended it after a panic
		return
	}
	op.done = true
	op.res, op.err = a.v, err
	if op.call == nil {
		return
	}
	a.fs = op.fs
	a.round = r.c.vouching(op, a.round)
	r.c.endFlight(op.key, op.fs)
	r.c.group.Finish(op.key, op.call, a, err)
}

// closedErr turns the cancellation Close causes into ErrClosed.
func (c *Cache[T]) closedErr(err error) error {
	if err != nil && c.stop.Err() != nil && errors.Is(err, context.Canceled) {
		return ErrClosed
	}
	return err
}

// unavailable is the FailClosed error for a Redis failure err.
func unavailable(err error) error {
	if errors.Is(err, ErrRedisUnavailable) {
		return err
	}
	return fmt.Errorf("%w: %w", ErrRedisUnavailable, err)
}

// spread returns d scaled by a random factor in [0.5, 1.5), so retries and
// polls of many processes do not fall in step. (Policy.jitter is the other
// randomness: it shortens TTLs, so entries filled together do not expire
// together.)
func spread(d time.Duration) time.Duration {
	return time.Duration(float64(d) * (0.5 + rand.Float64()))
}

// bypass loads ops from the source on the caller's goroutine, without
// Redis and without a flight: their keys have an invalidation pending
// (retry.go), so neither the cache nor a load that began before the write
// may answer them. Each op's outcome is in op.res and op.err.
func (c *Cache[T]) bypass(ctx context.Context, ops []*keyOp[T], src source[T]) {
	r := &missRun[T]{c: c, ctx: ctx, src: src, ops: ops}
	r.loadDown(ops)
}
