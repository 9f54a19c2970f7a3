package main

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/seed-b4ec662f/cacheaside"
)

// Every invalid input gets its status and a short message, never the
// input echoed back whole, on SQLite and (with DATABASE_URL) PostgreSQL
// alike; nothing is written.
func TestInputTable(t *testing.T) {
	ta := newTestApp(t, nil)
	before := ta.countTasks(t)
	var t42 Task
	ta.getJSON(t, "/tasks/42", 200, &t42)
	long := func(s string, n int) string { return strings.Repeat(s, n) }
	body := func(title, status, tags string) string {
		return fmt.Sprintf(`{"org":"acme","title":%q,"status":%q,"assignee_id":1,"tags":%s}`, title, status, tags)
	}
	for _, tc := range []struct {
		name, method, path, body string
		code                     int
		want                     string
	}{
		{"11 MB body", "POST", "/tasks", `{"org":"acme","title":"` + long("x", 11<<20) + `"}`, 413, "larger than"},
		{"900 KB status", "POST", "/tasks", body("x", long("s", 900<<10), "[]"), 413, "larger than"},
		{"11 MB body, not JSON", "POST", "/tasks", long("x", 11<<20), 413, "larger than"},
		{"70 KB body, not JSON", "PUT", "/tasks/42", "<" + long("x", 70<<10), 413, "larger than"},
		{"10 KB status, not echoed", "POST", "/tasks", body("x", long("s", 10<<10), "[]"), 400, "status"},
		{"NUL in title", "POST", "/tasks", `{"org":"acme","title":"a\u0000b","status":"todo","assignee_id":1}`, 400, "control character"},
		{"newline in title", "PUT", "/tasks/42", `{"title":"a\nb","status":"todo","assignee_id":1}`, 400, "control character"},
		{"escape in a tag", "POST", "/tasks", body("x", "todo", `["ok","\u001b[31m"]`), 400, "tags[1] contains a control character"},
		{"201 CJK characters", "POST", "/tasks", body(long("漢", 201), "todo", "[]"), 400, "longer than 200 characters"},
		{"tag of 33 characters", "POST", "/tasks", body("x", "todo", `["`+long("é", 33)+`"]`), 400, "longer than 32 characters"},
		{"11 tags", "POST", "/tasks", body("x", "todo", `["a","b","c","d","e","f","g","h","i","j","k"]`), 400, "at most 10 tags"},
		{"org of 1,100 characters in a query", "GET", "/tasks?org=" + long("o", 1100), "", 400, "org is longer than 64 characters"},
		{"org of 1,100 characters in a body", "POST", "/tasks", `{"org":"` + long("o", 1100) + `","title":"x","status":"todo","assignee_id":1}`, 400, "org is longer"},
		{"org of 1,100 characters in a path", "GET", "/orgs/" + long("o", 1100) + "/stats", "", 400, "org is longer"},
		{"control character in an org", "GET", "/tasks?org=ac%00me", "", 400, "control character"},
		{"unknown field, long name", "POST", "/tasks", `{"` + long("f", 5000) + `":1}`, 400, "unknown field"},
		{"unknown query parameter, long", "GET", "/tasks?org=acme&" + long("q", 3000) + "=1", "", 400, "unknown query parameter"},
		{"long id", "GET", "/tasks/" + long("9", 3000), "", 400, "not a positive integer"},
		{"trailing data", "POST", "/tasks", body("x", "todo", "[]") + " x", 400, "malformed JSON"},
		{"empty body", "POST", "/tasks", "", 400, "empty body"},
		{"wrong type", "POST", "/tasks", `{"org":"acme","title":7}`, 400, "must be a string"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			code, b := ta.do(t, tc.method, tc.path, tc.body)
			if code != tc.code || !bytes.Contains(b, []byte(tc.want)) {
				t.Fatalf("%s %.60s = %d %.300s; want %d mentioning %q", tc.method, tc.path, code, b, tc.code, tc.want)
			}
			if len(b) > 300 {
				t.Fatalf("a %d-byte error message: %.300s…", len(b), b)
			}
		})
	}
	// Lengths are characters: 200 CJK characters (600 bytes) are a valid title.
	code, b := ta.do(t, "POST", "/tasks", body(long("漢", 200), "todo", `["日本語"]`))
	if code != 201 {
		t.Fatalf("200 CJK characters = %d %s, want 201", code, b)
	}
	if after := ta.countTasks(t); after != before+1 {
		t.Fatalf("task count %d → %d, want only the valid create", before, after)
	}
	var again Task
	ta.getJSON(t, "/tasks/42", 200, &again)
	if again.Title != t42.Title {
		t.Fatalf("a rejected PUT changed task 42: %q → %q", t42.Title, again.Title)
	}
}

// Every library error maps to a status; only the unexpected ones are
// logged, and none leaks its text.
func TestErrorMapping(t *testing.T) {
	var logged bytes.Buffer
	a := &API{log: slog.New(slog.NewTextHandler(&logged, nil))}
	for _, tc := range []struct {
		err        error
		code       int
		retryAfter bool
	}{
		{fmt.Errorf("key: %w", cacheaside.ErrInvalidKey), 400, false},
		{cacheaside.ErrOverloaded, 503, true},
		{fmt.Errorf("get: %w", cacheaside.ErrRedisUnavailable), 503, true},
		{cacheaside.ErrNotFound, 404, false},
		{invalidf("bad"), 400, false},
		{&http.MaxBytesError{Limit: maxBody}, 413, false},
		{errors.New("disk on fire at /var/lib/db"), 500, false},
	} {
		w := httptest.NewRecorder()
		a.fail(w, httptest.NewRequest("GET", "/x", nil), tc.err)
		if w.Code != tc.code || (w.Header().Get("Retry-After") != "") != tc.retryAfter {
			t.Errorf("%v → %d (Retry-After %q), want %d", tc.err, w.Code, w.Header().Get("Retry-After"), tc.code)
		}
		if strings.Contains(w.Body.String(), "disk on fire") {
			t.Errorf("the 500 leaked the error: %s", w.Body)
		}
	}
	if n := strings.Count(logged.String(), "level=ERROR"); n != 1 {
		t.Fatalf("%d ERROR lines, want 1 (the unexpected error only):\n%s", n, logged.String())
	}
}

// TestLargeBodyOfUnknownLength: a chunked body that is not JSON and is
// larger than maxBody is 413, not 400, though the decoder fails at its
// first byte.
func TestLargeBodyOfUnknownLength(t *testing.T) {
	ta := newTestApp(t, nil)
	for _, tc := range []struct {
		body string
		code int
	}{{strings.Repeat("x", 2*maxBody), 413}, {strings.Repeat("x", 100), 400}} {
		req, err := http.NewRequest("POST", ta.srv.URL+"/tasks", io.MultiReader(strings.NewReader(tc.body))) // no length: chunked
		if err != nil {
			t.Fatal(err)
		}
		res, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		res.Body.Close()
		if req.ContentLength != 0 || res.StatusCode != tc.code {
			t.Errorf("chunked body of %d bytes: %d (request length %d), want %d", len(tc.body), res.StatusCode, req.ContentLength, tc.code)
		}
	}
}
