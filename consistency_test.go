package cacheaside

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/alicebob/miniredis/v2"
	"github.com/redis/go-redis/v9"
)

// TestConsistencyRandomized runs many short random histories of readers
// (Gets, some with GetOptions.Reload, and GetMany) and writers against a fake versioned database and several Cache instances
// (separate "processes") on one Redis, with random delays where the lease
// protocol races: after a miss, inside the load, before the fill, after the
// replies of the acquire and fill scripts, and before an UNLINK. It checks,
// per history:
//
//   - quiescence: once every goroutine is done, a Get of every key on every
//     instance returns the database's current version;
//   - no stale read: a Get that started after an invalidation returned never
//     yields a version older than the one committed before that invalidation.
//
// One case is counted apart, not as stale: a Get that joins a load its own
// process began before another process's invalidation gets that load's
// value (Invalidate can forget in-flight loads only in its own process).
//
// It runs the harness again with invalidation faults (queued retries), and
// with soft load timeouts (values stale after 1 ms, reloads answered with
// the old value after 1 ms); at full size, the latter's control hands old
// values to every joined Get unchecked and must find stale values. Last, it
// runs the harness with the token check switched off (fills are plain SETs)
// and requires that it finds stale values there, so that a pass means
// something.
//
// Replay one history with CACHEASIDE_CONSISTENCY_SEED=<seed> (printed for
// every failing history): every history then uses that seed. Scheduling is
// not deterministic, so a replay reruns the same script of operations and
// delays, not necessarily the same interleaving; it runs many times.
func TestConsistencyRandomized(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		leases, control := 10000, 1000
		note := ""

		if testing.Short() {
			leases, control = leases/10, control/4
			note += "; -short"
		}
		base, replay := consistencySeed(t)
		// miniredis serializes every command, and its Lua under -race is
		// slow: spread the histories over a few servers.
		shards := []*backend{b}
		for b.mr != nil && len(shards) < consShards {
			mr := miniredis.RunT(t)
			shards = append(shards, &backend{name: b.name, addr: mr.Addr(), mr: mr, prefix: b.prefix})
		}

		on := runConsistency(t, shards, consConfig{mode: "lease", histories: leases, seed: base, replay: replay})
		t.Logf("consistency(%s): %d stale values in %d histories (%d Gets, %d invalidations, %d fills rejected; %v%s)",
			b.name, on.stale.Load(), on.histories.Load(), on.gets.Load(), on.invals.Load(), on.rejected.Load(), on.took.Round(time.Millisecond), note)
		if n := on.stale.Load(); n > 0 {
			t.Errorf("consistency(%s): %d stale values with leases on, in %d of %d histories (base seed %d); see the histories logged above",
				b.name, n, on.failed.Load(), on.histories.Load(), base)
		}

		faulty := leases / 5
		flt := runConsistency(t, shards, consConfig{mode: "fault", histories: faulty, seed: base + 2<<32, replay: replay, faults: true})
		t.Logf("consistency with invalidation faults (%s): %d stale values in %d histories (%d Gets, %d invalidations, %d of them failed and retried; %v%s)",
			b.name, flt.stale.Load(), flt.histories.Load(), flt.gets.Load(), flt.invals.Load(), flt.failedInvals.Load(), flt.took.Round(time.Millisecond), note)
		if n := flt.stale.Load(); n > 0 {
			t.Errorf("consistency with invalidation faults (%s): %d stale values in %d of %d histories (base seed %d)",
				b.name, n, flt.failed.Load(), flt.histories.Load(), base+2<<32)
		}
		if flt.failedInvals.Load() == 0 {
			t.Errorf("consistency with invalidation faults (%s): no invalidation failed; the fault injection is broken", b.name)
		}

		soft := runConsistency(t, shards, consConfig{mode: "soft", histories: leases / 5, seed: base + 3<<32, replay: replay, soft: true})
		t.Logf("consistency with soft load timeouts (%s): %d stale values in %d histories (%d Gets, %d invalidations, %d answers with the old value; %v%s)",
			b.name, soft.stale.Load(), soft.histories.Load(), soft.gets.Load(), soft.invals.Load(), soft.softs.Load(), soft.took.Round(time.Millisecond), note)
		if n := soft.stale.Load(); n > 0 {
			t.Errorf("consistency with soft load timeouts (%s): %d stale values in %d of %d histories (base seed %d)",
				b.name, n, soft.failed.Load(), soft.histories.Load(), base+3<<32)
		}
		if soft.softs.Load() == 0 {
			t.Errorf("consistency with soft load timeouts (%s): no Get was answered with the old value; the mode tests nothing", b.name)
		}
		tg := runConsistency(t, shards, consConfig{mode: "tags", histories: leases / 5, seed: base + 5<<32, replay: replay, tags: true})
		t.Logf("consistency with tags and Clear (%s): %d stale values in %d histories (%d Gets, %d invalidations; %v%s)",
			b.name, tg.stale.Load(), tg.histories.Load(), tg.gets.Load(), tg.invals.Load(), tg.took.Round(time.Millisecond), note)
		if n := tg.stale.Load(); n > 0 {
			t.Errorf("consistency with tags and Clear (%s): %d stale values in %d of %d histories (base seed %d)",
				b.name, n, tg.failed.Load(), tg.histories.Load(), base+5<<32)
		}
		if !testing.Short() {
			// The control of tags mode: reads ignore the tags'
			// generations; writers invalidate by tags and Clear only.
			tc := runConsistency(t, shards, consConfig{mode: "tagctrl", histories: control, seed: base + 6<<32, replay: replay, noTagCheck: true})
			t.Logf("consistency control (tags' generations not checked, %s): %d stale values found in %d histories (%v)",
				b.name, tc.stale.Load(), tc.histories.Load(), tc.took.Round(time.Millisecond))
			if tc.stale.Load() == 0 {
				t.Errorf("consistency control (tags' generations not checked, %s): no stale value in %d histories: the harness is too weak to show the check matters",
					b.name, tc.histories.Load())
			}
		}
		if !testing.Short() {
			// The control of soft mode: old values handed to every joined
			// Get, unchecked, are found stale. They are rare (6 to 13 in
			// 1,000 histories), so it runs twice the control's histories.
			sc := runConsistency(t, shards, consConfig{mode: "softctrl", histories: 2 * control, seed: base + 4<<32, replay: replay, softAny: true})
			t.Logf("consistency control (soft answers unchecked, %s): %d stale values found in %d histories (%d answers with the old value; %v)",
				b.name, sc.stale.Load(), sc.histories.Load(), sc.softs.Load(), sc.took.Round(time.Millisecond))
			if sc.stale.Load() == 0 {
				t.Errorf("consistency control (soft answers unchecked, %s): no stale value in %d histories: the harness is too weak to show the soft answer's check matters",
					b.name, sc.histories.Load())
			}
		}

		off := runConsistency(t, shards, consConfig{mode: "ctrl", histories: control, seed: base + 1<<32, replay: replay, control: true})
		t.Logf("consistency control (token check off, %s): %d stale values found in %d histories (%d of them after quiescence; %d Gets, %d invalidations; %v)",
			b.name, off.stale.Load(), off.histories.Load(), off.quiescent.Load(), off.gets.Load(), off.invals.Load(), off.took.Round(time.Millisecond))
		if off.stale.Load() == 0 {
			t.Fatalf("consistency control (token check off, %s): no stale value in %d histories: the harness is too weak to show the lease check matters",
				b.name, off.histories.Load())
		}
	})
}

// Shape of one history.
const (
	consCaches   = 2 // Cache instances ("processes") sharing one Redis
	consReaders  = 3
	consReadOps  = 3
	consWriters  = 2
	consWriteOps = 2
	consParallel = 8 // histories run at once
	consShards   = 2 // miniredis servers
	consReport   = 3 // failing histories printed in full per run
	consEnvSeed  = "CACHEASIDE_CONSISTENCY_SEED"
	consMaxDelay = 2 * time.Millisecond
)

// consistencySeed returns the base seed and whether it was given to replay.
func consistencySeed(t *testing.T) (uint64, bool) {
	if seed, ok := envSeed(t, consEnvSeed); ok {
		t.Logf("replaying seed %d in every history", seed)
		return seed, true
	}
	seed := rand.Uint64() >> 1
	t.Logf("base seed %d (history i uses seed base+i; the control run base+2^32+i)", seed)
	return seed, false
}

// consVal is a row as the cache stores it: its version. by names the Get
// whose loader produced the value when it comes straight from a loader call
// in this process (the caller's own load, or one it joined), and is empty
// on values decoded from Redis: consCodec does not encode it.
type consVal struct {
	V  int64
	by string
}

// consCodec stores a consVal as its decimal version: cheaper than JSON,
// which matters under -race.
type consCodec struct{}

func (consCodec) Format() byte { return 200 }

func (consCodec) Marshal(v consVal) ([]byte, error) { return strconv.AppendInt(nil, v.V, 10), nil }

func (consCodec) Unmarshal(data []byte, v *consVal) error {
	n, err := strconv.ParseInt(string(data), 10, 64)
	*v = consVal{V: n}
	return err
}

type consConfig struct {
	mode      string // key prefix part: runs on one backend never share keys
	histories int
	seed      uint64
	replay    bool
	control   bool // switch the token check off on every instance
	faults    bool // one single-key UNLINK in four fails: invalidations are queued and retried
	// soft: entries go stale after 1 ms and stay in the stale windows, and
	// a reload past 1 ms answers with the old value (Options.SoftLoadTimeout);
	// softAny hands those old values to every Get joined to the load,
	// unchecked (the control of soft mode).
	soft, softAny bool
	// tags: every key carries a tag shared with half the history's keys
	// and one shared with all of them, and writers invalidate by key, by
	// either tag or with Clear (Options.Tags, Clearable); noTagCheck makes
	// reads ignore the tags' generations (the control of tags mode).
	tags, noTagCheck bool
}

type consTotals struct {
	histories    atomic.Int64
	gets         atomic.Int64
	invals       atomic.Int64
	rejected     atomic.Int64 // fills refused, summed over the instances
	stale        atomic.Int64 // stale values the protocol promises to prevent
	quiescent    atomic.Int64 // of which found by the quiescence check
	failed       atomic.Int64 // histories with a stale value
	failedInvals atomic.Int64 // invalidations the fault injection failed
	softs        atomic.Int64 // answers with the old value at the soft load timeout, summed over the instances
	reported     atomic.Int64 // histories printed
	took         time.Duration
}

// consRef locates a key of a running history, for the hooks.
type consRef struct {
	h *consHistory
	j int
}

// runConsistency runs cfg.histories histories, consParallel at a time, on
// consCaches new instances per shard (one Redis each).
func runConsistency(t *testing.T, shards []*backend, cfg consConfig) *consTotals {
	t.Helper()
	var keys sync.Map // key → consRef, while its history runs
	type shard struct {
		b      *backend
		caches []*Cache[consVal]
		raw    *redis.Client // for cleanup, so that SCANs in later histories stay short
	}
	var all []shard
	for _, b := range shards {
		all = append(all, shard{b, newConsCaches(t, b, cfg, &keys), b.client(t)})
	}

	tot := &consTotals{}
	start := time.Now()
	var next atomic.Int64
	var wg sync.WaitGroup
	for w := range consParallel {
		sh := all[w%len(all)]
		b, caches, raw := sh.b, sh.caches, sh.raw
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := next.Add(1) - 1
				if i >= int64(cfg.histories) || t.Failed() && tot.reported.Load() >= consReport {
					return
				}
				seed := cfg.seed + uint64(i)
				if cfg.replay {
					seed = cfg.seed
				}
				h := newConsHistory(seed, b.key(fmt.Sprintf("%s:h%d:", cfg.mode, i)))
				h.faults = cfg.faults
				h.tags = cfg.tags || cfg.noTagCheck
				h.tagsOnly = cfg.noTagCheck
				for j, k := range h.keys {
					keys.Store(k, consRef{h, j})
				}
				h.run(t, caches, tot)
				for _, k := range h.keys {
					keys.Delete(k)
				}
				if err := raw.Unlink(context.Background(), h.keys...).Err(); err != nil {
					t.Errorf("cleanup: %v", err)
				}
				tot.histories.Add(1)
				if len(h.bad) > 0 {
					tot.failed.Add(1)
					if !cfg.control && !cfg.softAny && !cfg.noTagCheck && tot.reported.Add(1) <= consReport {
						t.Logf("%s", h.report())
					}
				}
			}
		}()
	}
	wg.Wait()
	tot.took = time.Since(start)
	for _, sh := range all {
		for _, c := range sh.caches {
			st := c.Stats()
			tot.rejected.Add(int64(st.FillsRejected))
			tot.softs.Add(int64(st.SoftTimeouts))
		}
	}
	return tot
}

// newConsCaches returns consCaches new instances on b whose hooks pause the
// history that owns the key.
func newConsCaches(t *testing.T, b *backend, cfg consConfig, keys *sync.Map) []*Cache[consVal] {
	caches := make([]*Cache[consVal], consCaches)
	for x := range caches {
		pause := func(point string) func(string) {
			return func(key string) {
				if r, ok := keys.Load(key); ok {
					ref := r.(consRef)
					ref.h.logf("c%d %s k%d", x, point, ref.j)
					ref.h.pause()
				}
			}
		}
		opts := &Options[consVal]{
			Name:    fmt.Sprintf("c%d", x),
			Codec:   consCodec{},
			Policy:  Policy{TTL: time.Minute, NoJitter: true, NoEarlyRefresh: true},
			PollMin: 2 * time.Millisecond,
			PollMax: 8 * time.Millisecond,
			// The test is about the protocol, not the budget: a command
			// slowed by the injected pauses and -race must not time out.
			Degradation: Degradation{OpTimeout: 5 * time.Second},
		}
		if cfg.soft || cfg.softAny {
			opts.Policy = Policy{TTL: time.Millisecond, StaleIfError: time.Hour, NoJitter: true, NoEarlyRefresh: true}
			opts.SoftLoadTimeout = time.Millisecond
		}
		if cfg.tags || cfg.noTagCheck {
			// One Name: the processes of one service share their tags.
			opts.Name, opts.Tags, opts.Clearable = "tags", consTags, true
		}
		c, err := New[consVal](&consRedis{Client: b.client(t), pause: pause}, opts)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = c.Close() })
		c.hooks = &testHooks{afterMiss: pause("afterMiss"), beforeFill: pause("beforeFill"), fill: noTokenCheck(cfg.control), noExtend: true,
			softAny: cfg.softAny, noTagCheck: cfg.noTagCheck}
		caches[x] = c
	}
	return caches
}

// consTags are the tags of a history's key <prefix>k<j>: <prefix>t<j%2>,
// shared with half the keys, and <prefix>all.
func consTags(key string) []string {
	i := strings.LastIndex(key, "k")
	j, err := strconv.Atoi(key[i+1:])
	if err != nil {
		return nil
	}
	return []string{consTag(key[:i], j), key[:i] + "all"}
}

func consTag(prefix string, j int) string { return prefix + "t" + strconv.Itoa(j%2) }

// consRedis is a client that may stall after Redis answered a lease script
// (acquire or fill), or before an UNLINK, as a process descheduled around a
// round trip would: delay points the testHooks do not reach.
type consRedis struct {
	*redis.Client
	pause func(point string) func(key string)
}

// consFailUnlink marks the context of an invalidation whose UNLINKs fail
// (faults mode); the retries run on the cache's own context and succeed.
type consFailUnlink struct{}

func (r *consRedis) EvalSha(ctx context.Context, sha string, keys []string, args ...any) *redis.Cmd {
	cmd := r.Client.EvalSha(ctx, sha, keys, args...)
	r.stall(sha, keys)
	return cmd
}

func (r *consRedis) Eval(ctx context.Context, script string, keys []string, args ...any) *redis.Cmd {
	cmd := r.Client.Eval(ctx, script, keys, args...)
	switch script {
	case acquireLua:
		r.stall(acquireScript.Hash(), keys)
	case fillLua:
		r.stall(fillScript.Hash(), keys)
	}
	return cmd
}

// Unlink may stall before it is sent, between Invalidate's in-process
// Forget and the UNLINK itself.
func (r *consRedis) Unlink(ctx context.Context, keys ...string) *redis.IntCmd {
	if len(keys) > 0 {
		r.pause("before UNLINK")(keys[0])
		if ctx.Value(consFailUnlink{}) != nil {
			cmd := redis.NewIntCmd(ctx, "unlink", keys[0])
			cmd.SetErr(errors.New("i/o timeout (injected)"))
			return cmd
		}
	}
	return r.Client.Unlink(ctx, keys...)
}

func (r *consRedis) stall(sha string, keys []string) {
	if len(keys) == 0 {
		return
	}
	switch sha {
	case acquireScript.Hash():
		r.pause("after acquire reply")(keys[0])
	case fillScript.Hash():
		r.pause("after fill reply")(keys[0])
	}
}

// consHistory is one history: a few keys of a fake database, their floors,
// and the record of what happened.
type consHistory struct {
	seed   uint64
	prefix string
	keys   []string
	db     []atomic.Int64 // committed version per key
	// floor[j] is the highest version of key j committed before an
	// invalidation of j that has returned; local[x][j] the same for
	// invalidations made through cache x. Writers raise them after the
	// invalidation returns, Gets read them before they start.
	floor []atomic.Int64
	local [consCaches][]atomic.Int64

	faults   bool           // inject invalidation failures (consConfig.faults)
	tags     bool           // invalidate by tags and Clear too (consConfig.tags)
	tagsOnly bool           // by tags and Clear only, never deleting a key (the control of tags mode)
	retries  sync.WaitGroup // waits for failed invalidations' retries to land

	start  time.Time
	mu     sync.Mutex
	rng    *rand.Rand // delays at the hook points
	events []consEvent
	bad    []string
}

func newConsHistory(seed uint64, prefix string) *consHistory {
	h := &consHistory{seed: seed, prefix: prefix, rng: rand.New(rand.NewPCG(seed, 0)), start: time.Now()}
	n := 2 + h.rng.IntN(3)
	for j := range n {
		h.keys = append(h.keys, prefix+"k"+strconv.Itoa(j))
	}
	h.db = make([]atomic.Int64, n)
	h.floor = make([]atomic.Int64, n)
	for x := range h.local {
		h.local[x] = make([]atomic.Int64, n)
	}
	return h
}

// pause is a random delay: none, a yield, or a sleep of up to consMaxDelay.
func (h *consHistory) pause() {
	h.mu.Lock()
	r := h.rng.IntN(100)
	d := rand.N(consMaxDelay)
	h.mu.Unlock()
	switch {
	case r < 45:
	case r < 70:
		runtime.Gosched()
	default:
		time.Sleep(d)
	}
}

// logf records an event; it is formatted only if the history is printed.
func (h *consHistory) logf(format string, args ...any) {
	at := time.Since(h.start)
	h.mu.Lock()
	h.events = append(h.events, consEvent{at, format, args})
	h.mu.Unlock()
}

type consEvent struct {
	at     time.Duration
	format string
	args   []any
}

func (h *consHistory) violation(format string, args ...any) {
	msg := fmt.Sprintf(format, args...)
	h.logf("STALE: %s", msg)
	h.mu.Lock()
	h.bad = append(h.bad, msg)
	h.mu.Unlock()
}

func (h *consHistory) report() string {
	h.mu.Lock()
	defer h.mu.Unlock()
	var s strings.Builder
	fmt.Fprintf(&s, "history seed %d (%d keys): %d stale values:\n", h.seed, len(h.keys), len(h.bad))
	for _, m := range h.bad {
		fmt.Fprintf(&s, "  %s\n", m)
	}
	s.WriteString("  events:\n")
	for _, e := range h.events {
		fmt.Fprintf(&s, "    %8.3fms  %s\n", float64(e.at.Microseconds())/1000, fmt.Sprintf(e.format, e.args...))
	}
	return s.String()
}

func atomicMax(a *atomic.Int64, v int64) {
	for {
		cur := a.Load()
		if v <= cur || a.CompareAndSwap(cur, v) {
			return
		}
	}
}

// run plays the history on caches and checks it.
func (h *consHistory) run(t *testing.T, caches []*Cache[consVal], tot *consTotals) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	// Start most keys warm (3 in 4): version 0, the database's first, written
	// through with Set (which is also cheaper than a load on miniredis,
	// whose scripts are slow). The others start cold.
	rng := rand.New(rand.NewPCG(h.seed, 1000))
	for j, key := range h.keys {
		if rng.IntN(4) == 0 {
			continue
		}
		x := rng.IntN(len(caches))
		h.logf("Set k%d = v0 on c%d", j, x)
		if err := caches[x].Set(ctx, key, consVal{V: 0}); err != nil {
			t.Errorf("seed %d: Set k%d on c%d: %v", h.seed, j, x, err)
		}
	}
	var wg sync.WaitGroup
	for r := range consReaders {
		rng := rand.New(rand.NewPCG(h.seed, uint64(1+r)))
		wg.Go(func() {
			for op := range consReadOps {
				h.read(ctx, t, caches, tot, rng, fmt.Sprintf("R%d.%d", r, op))
			}
		})
	}
	for w := range consWriters {
		rng := rand.New(rand.NewPCG(h.seed, uint64(100+w)))
		wg.Go(func() {
			for op := range consWriteOps {
				h.write(ctx, t, caches, tot, rng, fmt.Sprintf("W%d.%d", w, op))
			}
		})
	}
	wg.Wait()
	h.retries.Wait()

	// Quiescence: the cache equals the database, on every instance.
	for j, key := range h.keys {
		want := h.db[j].Load()
		for x, c := range caches {
			got, err := c.Get(ctx, key, func(context.Context) (consVal, error) {
				return consVal{V: h.db[j].Load()}, nil
			})
			tot.gets.Add(1)
			if err != nil {
				t.Errorf("seed %d: quiescent Get k%d on c%d: %v", h.seed, j, x, err)
				continue
			}
			if got.V != want {
				tot.stale.Add(1)
				tot.quiescent.Add(1)
				h.violation("after quiescence, Get k%d on c%d = v%d, database has v%d", j, x, got.V, want)
			}
		}
	}
}

// read is one Get, or (one time in four) one GetMany, checked against the
// floors it saw before it started.
func (h *consHistory) read(ctx context.Context, t *testing.T, caches []*Cache[consVal], tot *consTotals, rng *rand.Rand, op string) {
	if rng.IntN(4) == 0 {
		h.readMany(ctx, t, caches, tot, rng, op)
		return
	}
	j, x := rng.IntN(len(h.keys)), rng.IntN(len(caches))
	if rng.IntN(3) == 0 {
		h.pause()
	}
	var per GetOptions
	how := "Get"
	if rng.IntN(8) == 0 { // a Reload: the refresh lease taken over a value, its fill or keep raced too
		per.Reload, how = true, "Get(Reload)"
	}
	floor, local := h.floor[j].Load(), h.local[x][j].Load()
	h.logf("%s %s k%d on c%d: start (floor v%d, this process's floor v%d)", op, how, j, x, floor, local)
	got, err := caches[x].Get(ctx, h.keys[j], func(context.Context) (consVal, error) {
		v := h.db[j].Load()
		h.logf("%s load k%d on c%d: read v%d", op, j, x, v)
		h.pause()
		return consVal{V: v, by: op}, nil
	}, per)
	tot.gets.Add(1)
	if err != nil {
		t.Errorf("seed %d: %s Get k%d on c%d: %v", h.seed, op, j, x, err)
		return
	}
	src := "from Redis"
	joined := got.by != "" && got.by != op
	switch {
	case got.by == "":
	case joined:
		src = fmt.Sprintf("joined %s's load", got.by)
	default:
		src = "own load"
	}
	h.logf("%s Get k%d on c%d: returned v%d (%s)", op, j, x, got.V, src)
	switch {
	case got.V < local:
		tot.stale.Add(1)
		h.violation("%s Get k%d on c%d returned v%d (%s), but v%d was committed and invalidated through c%d before it started",
			op, j, x, got.V, src, local, x)
	case got.V < floor:
		tot.stale.Add(1)
		h.violation("%s Get k%d on c%d returned v%d (%s), but v%d was committed and invalidated before it started",
			op, j, x, got.V, src, floor)
	}
}

// readMany is one GetMany of a random subset of the keys.
func (h *consHistory) readMany(ctx context.Context, t *testing.T, caches []*Cache[consVal], tot *consTotals, rng *rand.Rand, op string) {
	x := rng.IntN(len(caches))
	var js []int
	for j := range h.keys {
		if rng.IntN(2) == 0 {
			js = append(js, j)
		}
	}
	if len(js) == 0 {
		js = append(js, rng.IntN(len(h.keys)))
	}
	if rng.IntN(3) == 0 {
		h.pause()
	}
	floor, local := make([]int64, len(h.keys)), make([]int64, len(h.keys))
	for _, j := range js {
		floor[j], local[j] = h.floor[j].Load(), h.local[x][j].Load()
	}
	h.logf("%s GetMany %v on c%d: start (floors %v, this process's %v)", op, js, x, floor, local)
	got, err := GetMany(ctx, caches[x], js, func(j int) string { return h.keys[j] }, func(_ context.Context, ids []int) (map[int]consVal, error) {
		m := make(map[int]consVal, len(ids))
		for _, j := range ids {
			m[j] = consVal{V: h.db[j].Load(), by: op}
		}
		h.logf("%s batch load %v on c%d: read %v", op, ids, x, m)
		h.pause()
		return m, nil
	})
	tot.gets.Add(int64(len(js)))
	if err != nil {
		t.Errorf("seed %d: %s GetMany on c%d: %v", h.seed, op, x, err)
		return
	}
	for _, j := range js {
		v, ok := got[j]
		if !ok {
			t.Errorf("seed %d: %s GetMany on c%d: no value for k%d", h.seed, op, x, j)
			continue
		}
		h.logf("%s GetMany k%d on c%d: returned v%d (by %q)", op, j, x, v.V, v.by)
		switch {
		case v.V < local[j]:
			tot.stale.Add(1)
			h.violation("%s GetMany k%d on c%d returned v%d, but v%d was committed and invalidated through c%d before it started", op, j, x, v.V, local[j], x)
		case v.V < floor[j]:
			tot.stale.Add(1)
			h.violation("%s GetMany k%d on c%d returned v%d, but v%d was committed and invalidated before it started", op, j, x, v.V, floor[j])
		}
	}
}

// write commits a new version of one key and invalidates it, by key or by
// a prefix (the key itself, or the history's prefix, which covers every key).
func (h *consHistory) write(ctx context.Context, t *testing.T, caches []*Cache[consVal], tot *consTotals, rng *rand.Rand, op string) {
	j, x, how := rng.IntN(len(h.keys)), rng.IntN(len(caches)), rng.IntN(3)
	if h.tags {
		how = []int{0, 3, 3, 4, 5}[rng.IntN(5)] // by key, by its tag (twice as often), by the tag of all, Clear
		if h.tagsOnly {
			how = []int{3, 3, 4, 5}[rng.IntN(4)]
		}
	}
	if rng.IntN(3) == 0 {
		h.pause()
	}
	v := h.db[j].Add(1)
	h.logf("%s commit k%d = v%d", op, j, v)
	if rng.IntN(2) == 0 {
		h.pause()
	}
	covered := []int{j}
	switch how {
	case 2, 4, 5:
		covered = covered[:0]
		for jj := range h.keys {
			covered = append(covered, jj)
		}
	case 3:
		covered = covered[:0]
		for jj := range h.keys {
			if jj%2 == j%2 {
				covered = append(covered, jj)
			}
		}
	}
	// Every version committed by now is older than the UNLINK that comes.
	snap := make([]int64, len(covered))
	for i, jj := range covered {
		snap[i] = h.db[jj].Load()
	}
	// With faults, one single-key invalidation in four fails at its UNLINK:
	// the writer's process must still read its own write, and every
	// process once the retry has landed.
	fault := h.faults && how < 2 && rng.IntN(4) == 0
	ictx := ctx
	if fault {
		ictx = context.WithValue(ctx, consFailUnlink{}, true)
	}
	var err error
	switch how {
	case 0:
		h.logf("%s Invalidate(k%d) on c%d: start", op, j, x)
		_, err = caches[x].Invalidate(ictx, h.keys[j])
	case 1:
		h.logf("%s InvalidatePrefix(k%d) on c%d: start", op, j, x)
		_, err = caches[x].InvalidatePrefix(ictx, h.keys[j])
	case 2:
		h.logf("%s InvalidatePrefix(history) on c%d: start", op, x)
		_, err = caches[x].InvalidatePrefix(ctx, h.prefix)
	case 3:
		h.logf("%s InvalidateTags(t%d) on c%d: start", op, j%2, x)
		err = caches[x].InvalidateTags(ctx, consTag(h.prefix, j))
	case 4:
		h.logf("%s InvalidateTags(all) on c%d: start", op, x)
		err = caches[x].InvalidateTags(ctx, h.prefix+"all")
	default:
		h.logf("%s Clear on c%d: start", op, x)
		err = caches[x].Clear(ctx)
	}
	tot.invals.Add(1)
	if err != nil && fault {
		tot.failedInvals.Add(1)
		for i, jj := range covered {
			atomicMax(&h.local[x][jj], snap[i])
		}
		h.logf("%s invalidation on c%d failed (injected): this process's floor raised to %v; the others' when the retry lands", op, x, snap)
		h.retries.Go(func() {
			deadline := time.Now().Add(10 * time.Second)
			for caches[x].retries.covers(h.keys[j], verKeys{}) {
				if time.Now().After(deadline) {
					t.Errorf("seed %d: %s: the retry of k%d's invalidation did not land in 10s", h.seed, op, j)
					return
				}
				time.Sleep(time.Millisecond)
			}
			for i, jj := range covered {
				atomicMax(&h.floor[jj], snap[i])
			}
			h.logf("%s retry of the invalidation on c%d landed (floors raised to %v)", op, x, snap)
		})
		return
	}
	if err != nil {
		t.Errorf("seed %d: %s invalidate on c%d: %v", h.seed, op, x, err)
		return
	}
	// local first: a Get that sees the raised floor also sees the raised
	// local floor, so a violation is reported against the invalidation
	// from its own process when there was one.
	for i, jj := range covered {
		atomicMax(&h.local[x][jj], snap[i])
		atomicMax(&h.floor[jj], snap[i])
	}
	h.logf("%s invalidation on c%d returned (floors raised to %v)", op, x, snap)
}
