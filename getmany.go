package cacheaside

import (
	"context"
	"errors"
	"fmt"
	"runtime/debug"
	"strings"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/seed-b4ec662f/cacheaside/internal/envelope"
	"github.com/seed-b4ec662f/cacheaside/internal/flight"
)

// Batches. GetMany is Get for many ids at once, with the same entry
// protocol per key: the same entries, leases, tombstones and in-process
// flights, so a batch and single Gets of the same key share one load. What
// it batches is the I/O: one read for all keys, one pipeline of lease
// scripts for the misses, one loader call for everything this caller ends
// up loading, one pipeline of fills.

// BatchLoader loads the values for ids from the source of truth in one
// call. Ids missing from the returned map do not exist: GetMany caches a
// tombstone for each (within the policy's NegativeTTL) and leaves them out
// of its result. An error fails every id of the call and is cached for
// none. ctx follows the same rules as a Loader's.
type BatchLoader[K comparable, T any] func(ctx context.Context, ids []K) (map[K]T, error)

// KeyError is the error of one key of a GetMany. GetMany joins them.
type KeyError struct {
	Key string
	Err error
}

func (e *KeyError) Error() string { return fmt.Sprintf("cacheaside: key %q: %v", e.Key, e.Err) }

func (e *KeyError) Unwrap() error { return e.Err }

// maxMGet is the most keys one MGET carries; a larger batch sends several
// in one pipeline.
const maxMGet = 1000

var errNilBatch = errors.New("cacheaside: GetMany with a nil Cache, key function or BatchLoader")

// GetMany returns the values for ids, loading the ones Redis does not have
// with one call of load. key maps an id to its cache key (usually a
// Keyspace or Namespace method).
//
// Hits cost one round trip: one MGET (one per node, pipelined, on Redis
// Cluster or a Ring), with the namespace generations of a namespaced cache
// in the same read. For the misses, GetMany takes a lease per key (one
// pipeline), calls load once with the ids it holds leases for, and fills
// them (one pipeline). Per key it behaves like Get: a key another Get or
// GetMany of this process is loading is joined rather than loaded again; a
// key another process holds the lease on is waited for, as Get waits;
// stale and early-refresh rules apply to each hit.
//
// The result holds every id that has a value. Ids that do not exist (a
// tombstone, or left out by load) are absent from it and are not errors.
// The error joins a *KeyError for each key that failed: an invalid key
// (ErrInvalidKey), load's error for the ids it was loading, ctx's error for
// the keys not done when ctx ended, ErrRedisUnavailable under FailClosed;
// the other keys are still in the result. Redis failures are handled as
// Get handles them: under FailOpen the ids go to load, uncached, within
// MaxLoadsWhileDown (one slot per batch). Duplicate ids, or ids with the
// same key, are read and loaded once.
func GetMany[K comparable, T any](ctx context.Context, c *Cache[T], ids []K, key func(K) string, load BatchLoader[K, T]) (map[K]T, error) {
	if c == nil || key == nil || load == nil {
		return nil, errNilBatch
	}
	if c.closed.Load() {
		return nil, ErrClosed
	}
	out := make(map[K]T, len(ids))
	var errs []error
	items := make([]*batchItem[K, T], 0, len(ids))
	byKey := make(map[string]*batchItem[K, T], len(ids))
	for _, id := range ids {
		k := key(id)
		if it, dup := byKey[k]; dup {
			it.ids = append(it.ids, id)
			if it.local != nil && !it.local.notFound {
				out[id] = it.local.v
			}
			continue
		}
		genKey, err := c.checkKey(k)
		if err != nil {
			errs = append(errs, &KeyError{Key: k, Err: err})
			byKey[k] = &batchItem[K, T]{key: k}
			continue
		}
		it := &batchItem[K, T]{ids: []K{id}, key: k, genKey: genKey}
		byKey[k] = it
		if l := c.local; l != nil {
			if li, ok := l.lookup(k, c.opts.Clock().UnixNano()); ok {
				c.countLocal(0, li.notFound)
				if !li.notFound {
					out[id] = li.v
				}
				it.local = li
				continue
			}
			it.snap = l.snap(k, genKey)
		}
		items = append(items, it)
	}
	if len(items) == 0 {
		return out, errors.Join(errs...)
	}

	start := c.flights.Load()
	for _, it := range items {
		if f, ok := c.inflight.Load(it.key); ok {
			it.seen = flightSeen{f.(*flightState), f.(*flightState).observing.Load()}
		}
	}
	readMany(ctx, c, items)
	if cerr := ctx.Err(); cerr != nil {
		for _, it := range items {
			errs = append(errs, &KeyError{Key: it.key, Err: cerr})
		}
		return out, errors.Join(errs...)
	}

	now := c.opts.Clock()
	var misses []*batchItem[K, T]
	var failed errorOnce
	for _, it := range items {
		if it.err != nil {
			if isWrongType(it.err) {
				c.corrupt(ctx, it.key, nil, it.err)
				c.count(0, outMiss)
				misses = append(misses, it)
				continue
			}
			c.count(0, outMiss)
			failed.add(it.key, it.err)
			if c.opts.OnRedisDown == FailClosed {
				errs = append(errs, &KeyError{Key: it.key, Err: unavailable(it.err)})
				continue
			}
			it.down = true
			misses = append(misses, it)
			continue
		}
		it.vw = c.classify(ctx, it.key, it.b, it.gv, now)
		it.b = nil
		switch it.vw.state {
		case stFresh:
			c.count(0, outHit)
			c.keepLocal(it.key, &it.vw, now, it.snap)
			it.put(out, it.vw.v)
			if it.vw.e.Kind == envelope.Value && c.refreshEarly(&it.vw.e, now) {
				c.refreshAsync(ctx, it.key, it.genKey, one(load, it.ids[0]), it.vw.e)
			}
			continue
		case stStale:
			c.count(0, outStale)
			it.put(out, it.vw.v)
			if it.vw.e.Kind == envelope.Value {
				c.refreshAsync(ctx, it.key, it.genKey, one(load, it.ids[0]), it.vw.e)
			}
			continue
		case stNotFound:
			c.count(0, outNegative)
			c.keepLocal(it.key, &it.vw, now, it.snap)
			continue
		}
		c.count(0, outMiss)
		misses = append(misses, it)
	}
	failed.report(ctx, c, "get")
	if len(misses) == 0 {
		return out, errors.Join(errs...)
	}
	if h := c.hooks; h != nil && h.afterMiss != nil {
		for _, it := range misses {
			h.afterMiss(it.key)
		}
	}

	// Join the in-process flight of each missing key, or start one; the
	// flights this batch leads are loaded together.
	var owned []*batchItem[K, T]
	for _, it := range misses {
		var tok *envelope.Token
		if it.vw.e.Token != (envelope.Token{}) {
			tok = &it.vw.e.Token
		}
		it.trusted = it.seen.joinable(tok)
		it.call, it.leader = c.group.Join(it.key)
		if it.leader {
			it.fs = c.startFlight(it.key)
			owned = append(owned, it)
		}
	}
	if len(owned) > 0 {
		if c.enter() {
			go loadBatch(ctx, c, owned, load)
		} else {
			for _, it := range owned {
				finish(c, it, answer[T]{}, ErrClosed)
			}
		}
	}

	for _, it := range misses {
		select {
		case <-it.call.Done():
		case <-ctx.Done():
			errs = append(errs, &KeyError{Key: it.key, Err: ctx.Err()})
			continue
		}
		a, err := it.call.Result()
		v := a.v
		if !it.leader {
			v, err = c.joined(ctx, it.key, it.genKey, one(load, it.ids[0]), a, err, it.seen, it.trusted, it.down, 0, start)
		}
		switch {
		case err == nil:
			it.put(out, v)
		case errors.Is(err, ErrNotFound):
		default:
			errs = append(errs, &KeyError{Key: it.key, Err: err})
		}
	}
	return out, errors.Join(errs...)
}

// batchItem is one distinct key of a GetMany.
type batchItem[K comparable, T any] struct {
	ids    []K // the ids that map to key; loaded as ids[0]
	key    string
	genKey string
	local  *localItem[T] // found in the local tier
	snap   localSnap     // the local tier's epochs before the read

	// the read
	b    []byte
	gv   genView
	err  error
	vw   view[T]
	down bool // the read failed: load without Redis

	// the in-process flight
	seen    flightSeen
	trusted bool
	call    *flight.Call[answer[T]]
	leader  bool
	fs      *flightState // when leader

	// the load (loadBatch)
	tok  envelope.Token
	gen  envelope.Gen
	held bool
	done bool
}

func (it *batchItem[K, T]) put(out map[K]T, v T) {
	for _, id := range it.ids {
		out[id] = v
	}
}

// one turns a batch loader into the Loader of a single id, for what runs
// per key: background refreshes, and a key another process is loading.
func one[K comparable, T any](load BatchLoader[K, T], id K) Loader[T] {
	return func(ctx context.Context) (T, error) {
		m, err := load(ctx, []K{id})
		if err != nil {
			var zero T
			return zero, err
		}
		v, ok := m[id]
		if !ok {
			return v, ErrNotFound
		}
		return v, nil
	}
}

// readMany reads the entries of items, and their namespace generations,
// in one round trip: one MGET, or one GET per key in a pipeline where a
// multi-key command would cross slots.
func readMany[K comparable, T any](ctx context.Context, c *Cache[T], items []*batchItem[K, T]) {
	keys := make([]string, 0, len(items))
	gens := map[string]int{}
	for _, it := range items {
		keys = append(keys, it.key)
	}
	for _, it := range items {
		if it.genKey != "" {
			if _, ok := gens[it.genKey]; !ok {
				gens[it.genKey] = len(keys)
				keys = append(keys, it.genKey)
			}
		}
	}
	vals, errs := c.readKeys(ctx, keys)
	for i, it := range items {
		it.b, it.err = vals[i], errs[i]
		if it.genKey == "" {
			continue
		}
		j := gens[it.genKey]
		it.gv.namespaced = true
		if it.err == nil {
			it.err = errs[j]
		}
		if g := vals[j]; len(g) == envelope.GenSize {
			copy(it.gv.gen[:], g)
			it.gv.known = true
		}
	}
}

// readKeys reads keys in one round trip and returns, for each, its bytes
// (nil when absent or not a string) or the error of its read.
func (c *Cache[T]) readKeys(ctx context.Context, keys []string) ([][]byte, []error) {
	vals := make([][]byte, len(keys))
	errs := make([]error, len(keys))
	split := c.splitReads.Load()
	if !split && len(keys) <= 50 { // one command's budget is enough
		res, err := c.rdb.MGet(ctx, keys...).Result()
		if isCrossSlot(err) {
			// A client that shards (a wrapped Cluster client, say): read
			// per key from now on.
			c.splitReads.Store(true)
			split = true
		} else {
			mgetInto(vals, errs, 0, res, err)
			return vals, errs
		}
	}
	var cmds []redis.Cmder
	_, err := c.guard.pipe(ctx, c.guard.batchBudget(len(keys)), func(p redis.Pipeliner) error {
		if split {
			for _, k := range keys {
				cmds = append(cmds, p.Get(ctx, k))
			}
			return nil
		}
		for i := 0; i < len(keys); i += maxMGet {
			cmds = append(cmds, p.MGet(ctx, keys[i:min(i+maxMGet, len(keys))]...))
		}
		return nil
	})
	if cmds == nil { // not sent: the breaker is open
		for i := range errs {
			errs[i] = err
		}
		return vals, errs
	}
	if !split {
		for _, cmd := range cmds {
			if isCrossSlot(cmd.Err()) {
				c.splitReads.Store(true)
				return c.readKeys(ctx, keys)
			}
		}
	}
	for i, cmd := range cmds {
		switch cmd := cmd.(type) {
		case *redis.StringCmd:
			b, err := cmd.Bytes()
			if err == nil {
				vals[i] = b
			} else if !errors.Is(err, redis.Nil) {
				errs[i] = err
			}
		case *redis.SliceCmd:
			res, err := cmd.Result()
			mgetInto(vals, errs, i*maxMGet, res, err)
		}
	}
	return vals, errs
}

// mgetInto stores the reply of an MGET of the keys from off on.
func mgetInto(vals [][]byte, errs []error, off int, res []any, err error) {
	if err == nil && len(res) != min(len(vals)-off, maxMGet) {
		err = fmt.Errorf("MGET returned %d values", len(res))
	}
	if err != nil {
		for i := off; i < min(off+maxMGet, len(vals)); i++ {
			errs[i] = err
		}
		return
	}
	for i, r := range res {
		if s, ok := r.(string); ok {
			vals[off+i] = []byte(s)
		}
	}
}

func isCrossSlot(err error) bool {
	var re redis.Error
	return errors.As(err, &re) && strings.HasPrefix(re.Error(), "CROSSSLOT")
}

// evalMany runs the script calls in one pipeline (one round trip per node)
// and returns each call's reply. Scripts go by EVALSHA; any the server
// does not have yet (NOSCRIPT) are sent again by EVAL. Every script is
// safe to run twice, so this is safe however the first round went.
func (c *Cache[T]) evalMany(ctx context.Context, calls []scriptCall) []*redis.Cmd {
	cmds := make([]*redis.Cmd, len(calls))
	send := func(idx []int, byEval bool) {
		_, err := c.guard.pipe(ctx, c.guard.batchBudget(len(idx)), func(p redis.Pipeliner) error {
			for _, i := range idx {
				sc := calls[i]
				if byEval {
					cmds[i] = sc.s.Eval(ctx, p, sc.keys, sc.args...)
				} else {
					cmds[i] = sc.s.EvalSha(ctx, p, sc.keys, sc.args...)
				}
			}
			return nil
		})
		for _, i := range idx {
			if cmds[i] == nil { // not sent
				cmds[i] = redis.NewCmd(ctx)
				cmds[i].SetErr(err)
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

// finish ends the flight it leads with a.
func finish[K comparable, T any](c *Cache[T], it *batchItem[K, T], a answer[T], err error) {
	it.done = true
	a.fs = it.fs
	c.endFlight(it.key, it.fs)
	c.group.Finish(it.key, it.call, a, err)
}

// loadBatch runs the flights a GetMany leads, in rounds: one pipeline of
// lease scripts for every key still open, then, together, one loader call
// for the keys whose leases it got (filled in one pipeline) and one for
// the keys Redis failed on (not cached). Keys another process holds the
// lease on are polled again in the next round, with the backoff Get uses,
// so however many of them there are, each round makes at most one call of
// each kind. Like run, it works on a context detached from the caller's
// cancellation, and every flight it leads ends, whatever happens.
func loadBatch[K comparable, T any](parent context.Context, c *Cache[T], owned []*batchItem[K, T], load BatchLoader[K, T]) {
	defer c.wg.Done()
	ctx, cancel := context.WithCancel(context.WithoutCancel(parent))
	defer cancel()
	defer context.AfterFunc(c.stop, cancel)()
	fail := c.closedErr
	var mu sync.Mutex // the down loads finish items from their own goroutine
	defer func() {
		var err error = errors.New("cacheaside: batch load ended without an answer")
		if r := recover(); r != nil {
			err = &PanicError{Value: r, Stack: debug.Stack()}
		}
		mu.Lock()
		defer mu.Unlock()
		for _, it := range owned {
			if !it.done {
				if it.held {
					c.releaseLater(it.key, it.tok, it.keep(c))
				}
				finish(c, it, answer[T]{}, err)
			}
		}
	}()

	var down, open []*batchItem[K, T]
	for _, it := range owned {
		it.tok = newToken()
		if it.down {
			it.fs.observe() // the loader reads the source now, with no entry to vouch for it
			down = append(down, it)
		} else {
			open = append(open, it)
		}
	}
	var (
		waitStart time.Time
		delay     = c.opts.PollMin
		waitCap   = c.opts.LoadTimeout + c.opts.LeaseTTL
	)
	for {
		var held []*batchItem[K, T]
		if len(open) > 0 {
			var failed []*batchItem[K, T]
			held, open, failed = leaseRound(ctx, c, open, fail)
			down = append(down, failed...)
		}
		var wg sync.WaitGroup
		if len(down) > 0 {
			items := down
			down = nil
			wg.Go(func() { loadDown(ctx, c, items, load, fail, &mu) })
		}
		if len(held) > 0 {
			fillBatch(ctx, c, held, load, fail)
		}
		wg.Wait()
		if len(open) == 0 {
			return
		}
		// Other processes hold leases on the rest: wait for their fills.
		if waitStart.IsZero() {
			waitStart = time.Now()
			c.stats.leaseContended.Add(uint64(len(open)))
			c.rec.LeaseContended(c.name)
		} else if time.Since(waitStart) > waitCap {
			// The holders neither filled nor let their leases lapse in the
			// time a load may take: answer from the source.
			c.waited(waitStart)
			down, open = open, nil
			continue
		}
		if err := sleep(ctx, jitter(delay)); err != nil {
			for _, it := range open {
				v, err := c.orStale(it.vw.v, fail(err), &it.vw)
				finish(c, it, answer[T]{v: v}, err)
			}
			return
		}
		delay = min(2*delay, c.opts.PollMax)
	}
}

// leaseRound sends the lease scripts of items in one pipeline. It finishes
// the items whose key turned out to hold an answer, and returns those it
// now holds the lease on, those still being loaded elsewhere, and those
// Redis failed on (to load without Redis).
func leaseRound[K comparable, T any](ctx context.Context, c *Cache[T], items []*batchItem[K, T], fail func(error) error) (held, open, failed []*batchItem[K, T]) {
	calls := make([]scriptCall, len(items))
	for i, it := range items {
		it.fs.observe()
		if it.reload() {
			it.gen = it.vw.e.Gen
			calls[i] = refreshCall(it.key, it.genKey, it.vw.e.Token, it.tok, c.opts.LeaseTTL, c.genTTL)
		} else {
			calls[i] = acquireCall(it.key, it.genKey, leaseEntry(it.tok, c.opts.Codec.Format()), c.opts.LeaseTTL, it.vw.replace, c.genTTL)
		}
	}
	cmds := c.evalMany(ctx, calls)
	var failedOnce errorOnce
	for i, it := range items {
		var (
			ok  bool
			cur []byte
			err error
		)
		reload := it.reload()
		if reload {
			var n int64
			n, err = cmds[i].Int64()
			ok = n == 1
		} else {
			ok, it.gen, cur, err = acquireReply(cmds[i].Slice())
		}
		switch {
		case err != nil:
			if cerr := ctx.Err(); cerr != nil {
				v, err := c.orStale(it.vw.v, fail(cerr), &it.vw)
				finish(c, it, answer[T]{v: v}, err)
				continue
			}
			failedOnce.add(it.key, err)
			c.releaseLater(it.key, it.tok, it.keep(c)) // the script may have run, its reply lost
			if c.opts.OnRedisDown == FailClosed {
				v, err := c.orStale(it.vw.v, unavailable(err), &it.vw)
				finish(c, it, answer[T]{v: v}, err)
				continue
			}
			failed = append(failed, it)
		case ok:
			it.held = true
			tok := it.tok
			it.fs.tok.Store(&tok)
			held = append(held, it)
		case reload:
			// The value changed since it was read: look again, by acquire.
			it.vw = view[T]{staleOK: it.vw.staleOK, v: it.vw.v}
			open = append(open, it)
		default:
			vw := c.classify(ctx, it.key, cur, genView{namespaced: it.genKey != "", known: true, gen: it.gen}, c.opts.Clock())
			if vw.e.Token != (envelope.Token{}) {
				t := vw.e.Token
				it.fs.tok.Store(&t)
			}
			switch vw.state {
			case stFresh:
				finish(c, it, answer[T]{v: vw.v, tok: vw.e.Token}, nil)
			case stStale:
				c.stats.staleServed.Add(1)
				c.rec.StaleServed(c.name)
				finish(c, it, answer[T]{v: vw.v, tok: vw.e.Token}, nil)
			case stNotFound:
				finish(c, it, answer[T]{tok: vw.e.Token}, ErrNotFound)
			default:
				// Being loaded elsewhere, undecodable (replace names it),
				// or a value due for reload (refreshed next round).
				if vw.state == stLease {
					vw.v, vw.staleOK = it.vw.v, it.vw.staleOK
				}
				it.vw = vw
				open = append(open, it)
			}
		}
	}
	failedOnce.report(ctx, c, "acquire")
	return held, open, failed
}

// loadDown loads items without Redis (it failed on them), in one loader
// call within one MaxLoadsWhileDown slot, and finishes them.
func loadDown[K comparable, T any](ctx context.Context, c *Cache[T], items []*batchItem[K, T], load BatchLoader[K, T], fail func(error) error, mu *sync.Mutex) {
	end := func(it *batchItem[K, T], v T, err error) {
		mu.Lock()
		defer mu.Unlock()
		if it.done { // loadBatch gave up on it after a panic
			return
		}
		v, err = c.orStale(v, fail(err), &it.vw)
		finish(c, it, answer[T]{v: v}, err)
	}
	defer func() {
		if r := recover(); r != nil { // a Recorder or IsNotFound that panicked
			err := &PanicError{Value: r, Stack: debug.Stack()}
			for _, it := range items {
				end(it, *new(T), err)
			}
		}
	}()
	wctx, wcancel := context.WithTimeout(ctx, c.opts.LoadTimeout)
	done, err := c.loadSlot(wctx)
	wcancel()
	if err != nil {
		if errors.Is(err, ErrOverloaded) && c.stop.Err() != nil {
			err = ErrClosed
		}
		for _, it := range items {
			end(it, *new(T), err)
		}
		return
	}
	defer done()
	m, _, err := callBatch(ctx, c, items, load)
	for _, it := range items {
		v, ok := m[it.ids[0]]
		switch {
		case err != nil:
			end(it, v, err)
		case !ok:
			end(it, v, ErrNotFound)
		default:
			end(it, v, nil)
		}
	}
}

// reload reports whether the item is a value due for reload, whose lease
// is taken in place (refresh.lua) so it can be served if the reload fails.
func (it *batchItem[K, T]) reload() bool {
	return it.vw.state == stReload && it.vw.e.Kind == envelope.Value
}

// keep is how long the item's value may live on if its reload fails.
func (it *batchItem[K, T]) keep(c *Cache[T]) time.Duration {
	if it.reload() {
		return c.keepOnFailure(&it.vw.e)
	}
	return 0
}

// callBatch calls load once for the items' ids, counted as one load.
func callBatch[K comparable, T any](ctx context.Context, c *Cache[T], items []*batchItem[K, T], load BatchLoader[K, T]) (map[K]T, time.Duration, error) {
	ids := make([]K, len(items))
	for i, it := range items {
		ids[i] = it.ids[0]
	}
	start := c.opts.Clock()
	m, err := callFn(ctx, c.opts.LoadTimeout, func(ctx context.Context) (map[K]T, error) { return load(ctx, ids) })
	took := c.opts.Clock().Sub(start)
	c.loaded(took, err)
	return m, took, err
}

// fillBatch loads the items whose leases the batch holds and fills them
// (values, tombstones for ids load left out) in one pipeline, or releases
// them when load fails.
func fillBatch[K comparable, T any](ctx context.Context, c *Cache[T], held []*batchItem[K, T], load BatchLoader[K, T], fail func(error) error) {
	extends := make([]scriptCall, len(held))
	for i, it := range held {
		extends[i] = extendCall(it.key, it.tok, c.opts.LeaseTTL)
	}
	for _, it := range held {
		if c.local != nil {
			it.snap = c.local.snap(it.key, it.genKey) // before the loader reads the source
		}
	}
	stop := c.keepLeases(ctx, extends)
	m, took, err := callBatch(ctx, c, held, load)
	stop()
	// Fill and release must happen even if Close cancelled ctx.
	wctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), c.opts.LeaseTTL)
	defer cancel()
	p := c.opts.Policy
	if err != nil {
		calls := make([]scriptCall, len(held))
		for i, it := range held {
			calls[i] = releaseCall(it.key, it.tok, it.keep(c))
		}
		var failed errorOnce
		for i, cmd := range c.evalMany(wctx, calls) {
			if err := cmd.Err(); err != nil {
				failed.add(held[i].key, err)
			}
		}
		failed.report(wctx, c, "release")
		err = fail(err)
		for _, it := range held {
			v, err := c.orStale(it.vw.v, err, &it.vw)
			finish(c, it, answer[T]{v: v}, err)
		}
		return
	}
	type result struct {
		v   T
		err error
	}
	results := make([]result, len(held))
	calls := make([]scriptCall, len(held))
	fills := make([]bool, len(held))
	softs := make([]int64, len(held))
	for i, it := range held {
		v, ok := m[it.ids[0]]
		switch {
		case ok:
			results[i].v = v
			entry, ttl, merr := c.encode(v, it.tok, it.gen, took)
			if merr != nil {
				c.stats.notCached.Add(1)
				c.rec.NotCached(c.name)
				c.report(ctx, "encode", it.key, merr)
				calls[i] = releaseCall(it.key, it.tok, it.keep(c))
				continue
			}
			calls[i], fills[i], softs[i] = fillCall(it.key, it.genKey, it.tok, entry, ttl, c.genTTL), true, softExpiry(entry)
		case p.NoNegativeCache:
			results[i].err = ErrNotFound
			calls[i] = releaseCall(it.key, it.tok, 0)
		default:
			results[i].err = ErrNotFound
			ttl := p.jitter(p.NegativeTTL)
			soft := c.opts.Clock().Add(ttl)
			entry := tombstone(it.tok, c.opts.Codec.Format(), it.gen, soft)
			calls[i], fills[i], softs[i] = fillCall(it.key, it.genKey, it.tok, entry, ttl, c.genTTL), true, soft.UnixMilli()
		}
	}
	if h := c.hooks; h != nil {
		for i, it := range held {
			if h.beforeFill != nil {
				h.beforeFill(it.key)
			}
			if h.noTokenCheck && fills[i] {
				calls[i] = scriptCall{plainFillScript, calls[i].keys[:1], calls[i].args}
			}
		}
	}
	cmds := c.evalMany(wctx, calls)
	var failed errorOnce
	for i, it := range held {
		n, err := cmds[i].Int64()
		var tok envelope.Token
		switch {
		case err != nil:
			if fills[i] {
				c.releaseLater(it.key, it.tok, 0) // or other processes wait out the lease
			}
			failed.add(it.key, err)
		case fills[i] && n == 1:
			tok = it.tok
			c.putLocal(it.key, results[i].v, results[i].err != nil, softs[i], it.snap)
		case fills[i]:
			c.stats.fillsRejected.Add(1)
			c.rec.FillRejected(c.name)
		}
		it.fs.answer = tok
		finish(c, it, answer[T]{v: results[i].v, tok: tok}, results[i].err)
	}
	failed.report(wctx, c, "fill")
}

// errorOnce gathers the failures of the commands of one round trip, which
// usually share one cause, to report them once rather than once per key.
type errorOnce struct {
	keys  []string
	first error
}

func (e *errorOnce) add(key string, err error) {
	if e.first == nil {
		e.first = err
	}
	e.keys = append(e.keys, key)
}

// report counts and reports the first failure, labelled with every key
// that failed.
func (e *errorOnce) report(ctx context.Context, c interface {
	redisError(context.Context, string, string, error) error
}, op string) {
	if e.first != nil {
		c.redisError(ctx, op, keysLabel(e.keys), e.first)
	}
}

// keepLeases renews the batch's leases every LeaseTTL/3, in one pipeline,
// until the returned stop is called (it waits for the renewing goroutine).
func (c *Cache[T]) keepLeases(ctx context.Context, calls []scriptCall) (stop func()) {
	return c.renewing(ctx, func(ctx context.Context) bool {
		var failed errorOnce
		for i, cmd := range c.evalMany(ctx, calls) {
			if err := cmd.Err(); err != nil && ctx.Err() == nil {
				failed.add(calls[i].keys[0], err)
			}
		}
		failed.report(ctx, c, "extend")
		return true
	})
}

// plainFillScript fills without checking the lease: the broken protocol
// of testHooks.noTokenCheck.
var plainFillScript = redis.NewScript(`redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3]) return 1`)
