"""The case report: one offline HTML file (render, sections, figures, custody, style)."""
