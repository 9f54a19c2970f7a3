package main

import (
	"context"
	"net/http"
	"regexp"
	"strings"
	"time"
)

// Operator invalidation (lecture 4.3, pattern-based invalidation), behind
// ADMIN_TOKEN:
//
//   - DELETE /admin/cache/{cache}?prefix=P drops every entry of one cache
//     under P with InvalidatePrefix: SCAN with MATCH over the whole
//     keyspace, UNLINK in batches, and the bus message for every local
//     tier. The right tool when the keys cannot be named and no namespace
//     covers them: the entries a key-version bump left behind
//     (prefix v1:tasks: after the task keyspace moved to v2), or a
//     one-off clean-up. Its cost grows with the size of the database, not
//     of the prefix.
//   - POST /admin/orgs/{org}/lists/invalidate bumps the org's list
//     namespace: one SET of a new random generation, whatever the number
//     of pages cached. What the app's writes do on every change, and the
//     tool to prefer for any group of keys you can give a namespace in
//     advance.

// keyspaces maps each cache to its keyspace name (without the version).
func (s *Service) keyspaces() map[string]string {
	name := func(ks interface{ String() string }) string { // "v1:tasks" → "tasks"
		_, n, _ := strings.Cut(ks.String(), ":")
		return n
	}
	return map[string]string{"task": name(s.taskKeys), "task_list": name(s.listKeys), "org_stats": name(s.statsKeys)}
}

// PurgeResult is what a prefix purge did.
type PurgeResult struct {
	Cache   string  `json:"cache"`
	Prefix  string  `json:"prefix"`
	Deleted int64   `json:"deleted"`
	Millis  float64 `json:"took_ms"`
}

var versionPrefix = regexp.MustCompile(`^v[0-9]+:`)

// Purge deletes every entry of cache under prefix, which must name the
// cache's keyspace at some version ("v<n>:<keyspace>:..."), so an operator
// cannot wipe another cache's or application's keys by mistake.
func (s *Service) Purge(ctx context.Context, cache, prefix string) (PurgeResult, error) {
	name, ok := s.keyspaces()[cache]
	if !ok {
		return PurgeResult{}, invalidf("cache %s is not one of task, task_list, org_stats", short(cache))
	}
	if err := text("prefix", prefix, 256, true); err != nil {
		return PurgeResult{}, err
	}
	v := versionPrefix.FindString(prefix)
	if v == "" || !strings.HasPrefix(prefix[len(v):], name+":") {
		return PurgeResult{}, invalidf("prefix must start with v<version>:%s: (the %s cache's keys)", name, cache)
	}
	t0 := time.Now()
	var n int64
	var err error
	switch cache {
	case "task":
		n, err = s.tasks.InvalidatePrefix(ctx, prefix)
	case "task_list":
		n, err = s.lists.InvalidatePrefix(ctx, prefix)
	default:
		n, err = s.stats.InvalidatePrefix(ctx, prefix)
	}
	return PurgeResult{Cache: cache, Prefix: prefix, Deleted: n, Millis: float64(time.Since(t0).Microseconds()) / 1000}, err
}

// InvalidateOrgLists invalidates every list page of org: the tags of its
// pages of all tasks and of its assignee pages.
func (s *Service) InvalidateOrgLists(ctx context.Context, org string) error {
	return s.lists.InvalidateTags(ctx, s.orgListTags(org)...)
}

func (a *API) purge(w http.ResponseWriter, r *http.Request) {
	for k := range r.URL.Query() {
		if k != "prefix" {
			a.fail(w, r, invalidf("unknown query parameter %s (want prefix)", short(k)))
			return
		}
	}
	res, err := a.svc.Purge(r.Context(), r.PathValue("cache"), r.URL.Query().Get("prefix"))
	if err != nil {
		a.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, res)
}

func (a *API) invalidateOrgLists(w http.ResponseWriter, r *http.Request) {
	org := r.PathValue("org")
	if err := checkOrg(org); err != nil {
		a.fail(w, r, err)
		return
	}
	if err := a.svc.InvalidateOrgLists(r.Context(), org); err != nil {
		a.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, map[string]string{"org": org, "lists": "tags " + strings.Join(a.svc.orgListTags(org), ", ") + " invalidated"})
}
