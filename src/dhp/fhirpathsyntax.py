"""A strict parse of FHIRPath text, for definitions written through the API.

fhirpathpy's parser recovers from syntax errors silently (``name.where(((`` compiles, then fails or finds
nothing on every evaluation), so SearchParameter expressions and profile invariants a client writes are
parsed here first, with every error raised.
"""

from __future__ import annotations

from typing import Any


def parse(expression: str) -> Any:
    """The expression's AST (fhirpathpy's node dicts); ValueError naming the first syntax error."""
    from antlr4 import CommonTokenStream, InputStream
    from antlr4.error.ErrorListener import ErrorListener
    from antlr4.tree.Tree import ParseTreeWalker
    from fhirpathpy.parser.ASTPathListener import ASTPathListener
    from fhirpathpy.parser.generated.FHIRPathLexer import FHIRPathLexer
    from fhirpathpy.parser.generated.FHIRPathParser import FHIRPathParser

    class Raise(ErrorListener):  # type: ignore[misc]
        def syntaxError(self, recognizer: Any, offending: Any, line: int, column: int, msg: str,
                        e: Any) -> None:
            raise ValueError(f"column {column + 1}: {msg}")

    try:
        lexer = FHIRPathLexer(InputStream(expression))
        lexer.removeErrorListeners()
        lexer.addErrorListener(Raise())
        parser = FHIRPathParser(CommonTokenStream(lexer))
        parser.removeErrorListeners()
        parser.addErrorListener(Raise())
        tree = parser.entireExpression()
        listener = ASTPathListener()
        ParseTreeWalker().walk(listener, tree)
        return listener.parentStack[0]
    except RecursionError:
        raise ValueError("it is nested too deeply") from None
    except ValueError:
        raise
    except Exception as e:  # antlr raises its own exception types on lexer errors
        raise ValueError(str(e) or type(e).__name__) from None


def syntax_error(expression: str) -> str | None:
    """The first syntax error in ``expression``, or None."""
    try:
        parse(expression)
    except ValueError as e:
        return str(e)
    return None
