package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/seed-b4ec662f/cacheaside"
	"github.com/seed-b4ec662f/cacheaside/extra/cacheoutbox"
	"github.com/seed-b4ec662f/cacheaside/extra/cacheprometheus"
)

// The TTL table: every lifetime decision of the app in one place, from the
// lecture's guidelines (4.2, 4.4), overridable with CACHE_TTLS, for example
// CACHE_TTLS="task=2m,task_list=30s,org_stats.swr=1m".
var defaultTTLs = mustTTLTable(map[string]cacheaside.Policy{
	// Task details: 5 min + event-based invalidation on every write; a
	// missing id is remembered for 60 s (lecture 5.2).
	"task": {TTL: 5 * time.Minute, NegativeTTL: 60 * time.Second},
	// Task lists: 60 s + event-based invalidation of the whole org.
	"task_list": {TTL: 60 * time.Second, NegativeTTL: 10 * time.Second},
	// Dashboard stats: 2 min, TTL only, no event invalidation. Served stale
	// for another minute while one refresh runs, and for up to 10 minutes
	// if the database is failing.
	"org_stats": {TTL: 2 * time.Minute, StaleWhileRevalidate: time.Minute, StaleIfError: 10 * time.Minute},
	// User permissions are NOT in this table: they are never cached.
})

// taskLifetime is the task cache's Options.Lifetime: the lecture's "2-5
// min" for task details, decided by each task. A finished task rarely
// changes again and keeps the table's full TTL; an open one is being worked
// on and lives at most 2 minutes. The table's TTL stays the bound (0 means
// that bound), so CACHE_TTLS can still shorten both.
func taskLifetime(t Task, notFound bool, _ time.Duration) time.Duration {
	if notFound || t.Status == "done" {
		return 0
	}
	return openTaskTTL
}

// openTaskTTL is how long an open task (todo or doing) stays fresh.
const openTaskTTL = 2 * time.Minute

// mustTTLTable is NewTTLTable for a table written in the code: an invalid
// one is a programming error that stops the program at start-up.
func mustTTLTable(policies map[string]cacheaside.Policy) *cacheaside.TTLTable {
	t, err := cacheaside.NewTTLTable(policies)
	if err != nil {
		panic(err)
	}
	return t
}

// Service is the task API's logic: the store behind three caches.
type Service struct {
	store     *Store
	log       *slog.Logger
	localTier bool // the task cache has a local tier

	tasks *cacheaside.Cache[Task]     // one task by id
	lists *cacheaside.Cache[TaskPage] // list pages, one namespace per org
	stats *cacheaside.Cache[OrgStats] // org dashboards, TTL only

	taskKeys  cacheaside.Keyspace
	listKeys  cacheaside.Keyspace
	statsKeys cacheaside.Keyspace

	// crashAfterCommit makes a write return right after its commit without
	// invalidating, as a process killed there would (tests): the outbox's
	// relay must then do it.
	crashAfterCommit atomic.Bool
}

// NewService builds the caches on rdb with the policies of ttls. prefix,
// normally empty, is prepended to every keyspace name so tests can share
// one Redis. localTTL > 0 gives the task cache a local tier.
func NewService(store *Store, rdb cacheaside.Redis, ttls *cacheaside.TTLTable, log *slog.Logger, prefix string, localTTL time.Duration) (*Service, error) {
	s := &Service{store: store, log: log}
	var err error
	// Tasks are the hottest reads: a local tier answers repeated reads of a
	// task from memory for up to localTTL, and every write reaches every
	// instance's local tier through the invalidation bus.
	var local *cacheaside.LocalOptions
	s.localTier = localTTL > 0
	if localTTL > 0 {
		local = &cacheaside.LocalOptions{TTL: localTTL, Channel: "cacheaside:invalidate:" + prefix + "task"} // the default channel, with the app's prefix
	}
	if s.tasks, err = cacheaside.New(rdb, &cacheaside.Options[Task]{Name: "task", Policy: ttls.Get("task"), Lifetime: taskLifetime, Logger: log, Local: local}); err != nil {
		return nil, err
	}
	// List pages carry tags: a page of all of an org's tasks the tag of
	// its org, a page of one assignee's tasks the tags of that assignee
	// and of the org's assignee pages. A write to a task invalidates its
	// org's tag and its assignees' (before and after), so one SET per tag
	// drops every page the change can show on, and no other.
	s.listKeys = cacheaside.MustKeyspace(prefix+"task_lists", 1)
	if s.lists, err = cacheaside.New(rdb, &cacheaside.Options[TaskPage]{Name: "task_list", Policy: ttls.Get("task_list"), Logger: log,
		Tags: s.pageTags}); err != nil {
		return nil, err
	}
	// org_stats is an aggregate over an org's tasks, the slowest query here:
	// past its stale-while-revalidate window but inside StaleIfError, a
	// reload that keeps a request 300 ms answers with the old figures and
	// fills them when it returns (SoftLoadTimeout).
	if s.stats, err = cacheaside.New(rdb, &cacheaside.Options[OrgStats]{Name: "org_stats", Policy: ttls.Get("org_stats"), Logger: log, SoftLoadTimeout: 300 * time.Millisecond}); err != nil {
		return nil, err
	}
	if s.taskKeys, err = cacheaside.NewKeyspace(prefix+"tasks", 1); err != nil {
		return nil, err
	}
	s.statsKeys = cacheaside.MustKeyspace(prefix+"org_stats", 1)
	// Every write records what it invalidates in its own transaction.
	store.targets = func(ch change) []cacheoutbox.Target {
		ts := []cacheoutbox.Target{{Cache: s.tasks.Name(), Key: s.taskKey(ch.id)}}
		for _, tag := range s.changeTags(ch) {
			ts = append(ts, cacheoutbox.Target{Cache: s.lists.Name(), Tag: tag})
		}
		return ts
	}
	return s, nil
}

// Close stops the caches' background work.
func (s *Service) Close() {
	s.tasks.Close()
	s.lists.Close()
	s.stats.Close()
}

// Caches lists the caches, for /admin/cache-stats.
func (s *Service) Caches() []cacheprometheus.Source {
	return []cacheprometheus.Source{s.tasks, s.lists, s.stats}
}

func (s *Service) taskKey(id int64) string { return s.taskKeys.Key(strconv.FormatInt(id, 10)) }

// listKey is the key of one list page: of every task of org (assignee
// 0), or of one assignee's.
func (s *Service) listKey(org string, assignee int64, status string, page, size int) string {
	a := "any"
	if assignee != 0 {
		a = strconv.FormatInt(assignee, 10)
	}
	if status == "" {
		status = "any"
	}
	return s.listKeys.Key("org", org, "assignee", a, "status", status, "page", strconv.Itoa(page), "size", strconv.Itoa(size))
}

// pageTags is the lists cache's Options.Tags: what the page under key
// carries, read back from its key's parts (escaped, as in the key).
func (s *Service) pageTags(key string) []string {
	parts := strings.Split(strings.TrimPrefix(key, s.listKeys.Prefix()), ":")
	if len(parts) < 4 || parts[0] != "org" || parts[2] != "assignee" {
		return nil
	}
	if parts[3] == "any" {
		return []string{"org:" + parts[1]}
	}
	return []string{"assignee:" + parts[3], "assignees:" + parts[1]}
}

// part is p escaped as a key part: how pageTags sees it.
func (s *Service) part(p string) string {
	return strings.TrimPrefix(s.listKeys.Key(p), s.listKeys.String()+":")
}

// changeTags are the tags of every list page a change to a task can show
// on: its org's pages of all tasks, and the pages of its assignees.
func (s *Service) changeTags(ch change) []string {
	tags := []string{"org:" + s.part(ch.org)}
	for _, a := range ch.assignees {
		tags = append(tags, "assignee:"+strconv.FormatInt(a, 10))
	}
	return tags
}

// orgListTags are the tags of every list page of org.
func (s *Service) orgListTags(org string) []string {
	return []string{"org:" + s.part(org), "assignees:" + s.part(org)}
}

// GetTask: cache-aside with negative caching (lecture 3.3, 5.1, 5.2).
func (s *Service) GetTask(ctx context.Context, id int64) (Task, error) {
	return s.tasks.Get(ctx, s.taskKey(id), func(ctx context.Context) (Task, error) {
		return s.store.GetTask(ctx, id)
	})
}

// GetTasks: many tasks by id with one Redis read, and one query for all
// the ids Redis does not have. Missing ids are cached as "not found" like
// GetTask's, and left out of the result.
func (s *Service) GetTasks(ctx context.Context, ids []int64) (map[int64]Task, error) {
	return cacheaside.GetMany(ctx, s.tasks, ids, s.taskKey, s.store.GetTasks)
}

// ListTasks: a paginated list, every query parameter in the key (lecture
// 3.2), carrying the tags of its org or its assignee (pageTags).
func (s *Service) ListTasks(ctx context.Context, org string, assignee int64, status string, page, size int) (TaskPage, error) {
	p, err := s.lists.Get(ctx, s.listKey(org, assignee, status, page, size), func(ctx context.Context) (TaskPage, error) {
		p, err := s.store.ListTasks(ctx, org, assignee, status, page, size)
		if errors.Is(err, errNoOrg) {
			return TaskPage{}, cacheaside.ErrNotFound
		}
		return p, err
	})
	return p, err
}

// OrgStats: TTL only (lecture 4.4): no write invalidates it.
func (s *Service) OrgStats(ctx context.Context, org string) (OrgStats, error) {
	return s.stats.Get(ctx, s.statsKeys.Key(org), func(ctx context.Context) (OrgStats, error) {
		return s.store.OrgStats(ctx, org)
	})
}

// Permissions are never cached: they decide what a user may do, so they
// must come from the source of truth on every request. A revoked admin
// whose role sat in a cache for five minutes would stay an admin for five
// minutes (lecture 4.4).
func (s *Service) Permissions(ctx context.Context, user int64) (Permissions, error) {
	return s.store.UserPermissions(ctx, user)
}

// Writes. Each commits to the database, then invalidates (lecture 3.4,
// 4.3), and reports whether an invalidation could not be applied at once
// (queued). The write has committed either way, so the request succeeds;
// a queued invalidation is the library's to finish: it retries until the
// delete lands (Degradation.RetryInvalidations), and until then this
// process's Gets of those keys load from the database, so the writer
// reads its own write. The library logs the failure (bounded) and counts
// it (Stats.QueuedInvals, cacheaside_invalidations_queued_total); the
// handler adds a "Cache-Invalidation: queued" header.

// CreateTask writes, then invalidates the lists the task shows on and the
// new id's key, which may hold a cached "not found" from someone who asked
// for it before it existed.
func (s *Service) CreateTask(ctx context.Context, in TaskInput) (Task, bool, error) {
	ctx, cancel := writeContext(ctx)
	defer cancel()
	t, ch, rec, err := s.store.CreateTask(ctx, in)
	if err != nil {
		return Task{}, false, err
	}
	return t, s.invalidate(ctx, ch, rec), nil
}

// UpdateTask writes, then invalidates the task and the lists it showed or
// shows on (its org's, its old and new assignee's).
func (s *Service) UpdateTask(ctx context.Context, id int64, in TaskInput) (Task, bool, error) {
	ctx, cancel := writeContext(ctx)
	defer cancel()
	t, ch, rec, err := s.store.UpdateTask(ctx, id, in)
	if err != nil {
		return Task{}, false, err
	}
	return t, s.invalidate(ctx, ch, rec), nil
}

// DeleteTask deletes, then invalidates the task and the lists it showed
// on.
func (s *Service) DeleteTask(ctx context.Context, id int64) (bool, error) {
	ctx, cancel := writeContext(ctx)
	defer cancel()
	ch, rec, err := s.store.DeleteTask(ctx, id)
	if err != nil {
		return false, err
	}
	return s.invalidate(ctx, ch, rec), nil
}

// writeTimeout bounds a write and its invalidation together.
const writeTimeout = 10 * time.Second

// writeContext detaches a write from its request: a client that hangs up
// mid-UPDATE must not leave a committed row whose invalidation never ran
// (the request's context ending after the commit, before the invalidate).
// The write and its invalidation run to the end, under writeTimeout.
func writeContext(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.WithoutCancel(ctx), writeTimeout)
}

// invalidate runs after the database write has committed and reports
// whether an invalidation was queued for retry rather than applied. A
// Redis failure is queued by the library; ErrClosed (the service is
// shutting down) is not, and says nothing to the client about a retry.
// Neither is ErrNotPublished: the delete landed, only the message to the
// other instances' local tiers failed (the library logged it), and those
// expire their copies within the local TTL. When both landed, the write's
// outbox rows are deleted (the fast path); otherwise the outbox's relay
// applies them, even if this process dies first.
func (s *Service) invalidate(ctx context.Context, ch change, rec cacheoutbox.Receipt) (queued bool) {
	if s.crashAfterCommit.Load() {
		return false
	}
	_, e1 := s.tasks.Invalidate(ctx, s.taskKey(ch.id))
	e2 := s.lists.InvalidateTags(ctx, s.changeTags(ch)...)
	if e1 == nil && e2 == nil {
		if err := s.store.outbox.Done(ctx, rec); err != nil {
			s.log.Warn("deleting applied outbox rows failed; the relay applies them again", "err", err)
		}
	}
	q := func(err error) bool {
		return err != nil && !errors.Is(err, cacheaside.ErrClosed) && !errors.Is(err, cacheaside.ErrNotPublished)
	}
	return q(e1) || q(e2)
}

// drain waits, up to d, for the caches' queued invalidations to land, so
// a shutdown right after a queued write does not drop its retry (the
// queue lives in memory), and reports how many are still pending.
func (s *Service) drain(d time.Duration) uint64 {
	deadline := time.Now().Add(d)
	for {
		var n uint64
		for _, c := range s.Caches() {
			n += c.Stats().PendingInvals
		}
		if n == 0 || time.Now().After(deadline) {
			return n
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// describe names the policy of each cache, for the startup log.
func describe(ttls *cacheaside.TTLTable) string {
	out := ""
	for _, n := range ttls.Names() {
		p := ttls.Get(n)
		out += fmt.Sprintf("%s=%v ", n, p.TTL)
	}
	return out
}
