package cacheaside

import (
	"go/ast"
	"go/parser"
	"go/token"
	"path/filepath"
	"strings"
	"testing"
)

// maxExported is the most identifiers the package may export, methods of
// exported types included: the surface a user reads in one sitting. 76
// since Cache.Audit and its AuditReport; 77 since GetOptions; 80 since Peek, Peeked and SetMany; 82 since Reloading and ReloadingOf; 84 since InvalidateTags and Clear.
const maxExported = 84

// TestPublicAPISize counts what the package exports (types, functions,
// constants, variables, and the methods of exported types, as go doc
// lists them) and fails past maxExported: a new exported name has to
// replace one, or go to an internal package.
func TestPublicAPISize(t *testing.T) {
	fset := token.NewFileSet()
	paths, err := filepath.Glob("*.go")
	if err != nil {
		t.Fatal(err)
	}
	var files []*ast.File
	for _, p := range paths {
		if strings.HasSuffix(p, "_test.go") {
			continue
		}
		f, err := parser.ParseFile(fset, p, nil, 0)
		if err != nil {
			t.Fatal(err)
		}
		files = append(files, f)
	}
	var names []string
	{
		for _, f := range files {
			for _, d := range f.Decls {
				switch d := d.(type) {
				case *ast.FuncDecl:
					if !d.Name.IsExported() {
						continue
					}
					if d.Recv == nil {
						names = append(names, d.Name.Name)
						continue
					}
					recv := d.Recv.List[0].Type
					if s, ok := recv.(*ast.StarExpr); ok {
						recv = s.X
					}
					switch x := recv.(type) {
					case *ast.IndexExpr:
						recv = x.X
					case *ast.IndexListExpr:
						recv = x.X
					}
					if id, ok := recv.(*ast.Ident); ok && id.IsExported() {
						names = append(names, id.Name+"."+d.Name.Name)
					}
				case *ast.GenDecl:
					for _, s := range d.Specs {
						switch s := s.(type) {
						case *ast.TypeSpec:
							if s.Name.IsExported() {
								names = append(names, s.Name.Name)
							}
						case *ast.ValueSpec:
							for _, n := range s.Names {
								if n.IsExported() {
									names = append(names, n.Name)
								}
							}
						}
					}
				}
			}
		}
	}
	t.Logf("%d exported identifiers", len(names))
	if len(names) > maxExported {
		t.Errorf("the package exports %d identifiers, more than %d: %s", len(names), maxExported, strings.Join(names, ", "))
	}
}
