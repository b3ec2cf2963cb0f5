"""twofold's own adversarial answer-equivalence suite: (answer, gold, expected) per class of tricky answer.

Written for this project (Apache-2.0, like the rest of it); used by tests/test_verifier_tricky.py (every verdict
must be right, and above all no wrong answer may score 1) and by bench/verifier.py (the error-rate table). Each
class has answers that must match and near-misses that must not; the rules for the judgement calls (degrees,
units, equation orientation, assignments vs tuples) are in docs/verifier.md.
"""

T, F = True, False

TRICKY = {
    "unicode_scripts": [
        ("x⁴", "x^4", T), ("x⁴", "4x", F), ("10⁶", "1000000", T), ("10⁶", "106", F), ("x₂", "x_2", T),
        ("x₂", "2x", F), ("2⁻¹", "\\frac{1}{2}", T), ("2⁻¹", "21", F), ("2¹⁰", "1024", T), ("2¹⁰", "210", F),
        ("x²y³", "x^2y^3", T), ("x²y³", "6xy", F), ("a₁₀", "a_{10}", T), ("a₁₀", "10a", F), ("½", "0.5", T),
        ("3½", "3.5", T), ("3½", "15.5", F), ("e⁽²ˣ⁾", "e^{2x}", T), ("10⁻³", "0.001", T), ("10⁻³", "7", F),
        ("x³", "3x", F), ("x⁻²", "x^{-2}", T), ("x⁻²", "-2x", F), ("¼", "0.25", T), ("x₁+x₂", "x_1+x_2", T), ("x₁+x₂", "3x", F), ("2ⁿ", "2^n", T), ("2ⁿ", "2n", F), ("⅔", "\\frac{2}{3}", T), ("1⅔", "\\frac{5}{3}", T), ("1⅔", "\\frac{1}{3}", F),
    ],
    "nested_boxed": [
        ("\\boxed{\\boxed{5}}", "5", T), ("\\boxed{2^{\\boxed{3}}}", "3", F), ("\\boxed{2^{\\boxed{3}}}", "8", T),
        ("\\boxed{\\frac{1}{\\boxed{4}}}", "4", F), ("\\boxed{\\frac{1}{\\boxed{4}}}", "\\frac14", T),
        ("\\boxed{x=\\boxed{7}}", "7", T), ("\\boxed{1+\\fbox{2}}", "2", F), ("\\boxed{1+\\fbox{2}}", "3", T),
        ("\\boxed{3} \\text{ then } \\boxed{\\sqrt{\\boxed{16}}}", "16", F),
        ("\\boxed{3} \\text{ then } \\boxed{\\sqrt{\\boxed{16}}}", "4", T),
    ],
    "digits_beyond_35": [
        ("\\sqrt{2}(1+10^{-40})", "\\sqrt{2}", F), ("\\frac{\\pi}{1+10^{-40}}", "\\pi", F),
        ("e^{10^{-40}}", "1", F), ("\\cos(10^{-20})", "1", F), ("\\sqrt{10^{40}+1}", "10^{20}", F),
        ("\\frac{8717442233}{2774848045}", "\\pi", F),  # a continued-fraction convergent: 19 digits of pi
        ("\\ln(2)(1+10^{-45})", "\\ln 2", F), ("\\tan(\\frac{\\pi}{4}+10^{-40})", "1", F), ("(10^{50}+1)\\pi", "10^{50}\\pi", F), ("\\sin(x)(1+10^{-40})", "\\sin x", F), ("\\sqrt{2}^{1+10^{-40}}", "\\sqrt{2}", F), ("\\sqrt{3}+\\sqrt{2}\\cdot10^{-38}", "\\sqrt{3}", F),
        ("x\\sqrt{2}(1+10^{-40})", "\\sqrt{2}x", F), ("\\pi(1-10^{-36})", "\\pi", F),
        ("e^{\\pi\\sqrt{163}}", "262537412640768744", F),  # Ramanujan's constant: 30 digits agree
        ("\\cos(10^{-1000})", "1", F), ("\\tan(\\frac{\\pi}{4}+10^{-3000})", "1", F),  # beyond 1000 digits
        ("\\cos^2(10^{-300})+\\sin^2(10^{-300})", "1", T),
        ("\\sqrt{2}\\cdot\\sqrt{3}", "\\sqrt{6}", T), ("\\frac{\\pi}{1+10^{-40}}", "\\frac{10^{40}\\pi}{10^{40}+1}", T),
        ("\\sqrt{10^{40}+1}", "\\sqrt{10^{40}+1}", T), ("e^{\\ln 2 + \\ln 3}", "6", T),
        ("\\cos^2(1)+\\sin^2(1)", "1", T), ("\\sqrt{5+2\\sqrt{6}}", "\\sqrt{2}+\\sqrt{3}", T),
    ],
    "real_odd_roots": [
        ("\\sqrt[3]{-8}", "-2", T), ("\\sqrt[3]{-8}", "2", F), ("\\sqrt[3]{-8}", "1+i\\sqrt{3}", F),
        ("\\sqrt[3]{-27}", "-3", T), ("(-8)^{1/3}", "-2", T), ("(-32)^{\\frac{1}{5}}", "-2", T),
        ("(-8)^{2/3}", "4", T), ("(-8)^{2/3}", "-4", F), ("\\sqrt[3]{-2}", "-\\sqrt[3]{2}", T),
        ("\\sqrt[3]{-2}", "\\sqrt[3]{2}", F), ("\\sqrt{-4}", "2i", T), ("\\sqrt{-4}", "-2", F), ("\\sqrt{-4}", "2", F),
        ("\\sqrt[5]{-1}", "-1", T), ("1+\\sqrt[3]{-8}", "-1", T), ("1+\\sqrt[3]{-8}", "3", F), ("\\sqrt[4]{-16}", "-2", F), ("\\sqrt[3]{-\\frac{1}{8}}", "-\\frac12", T),
    ],
    "degrees_in_trig": [
        ("\\sin 30^\\circ", "\\frac{1}{2}", T), ("\\sin(30^{\\circ})", "0.5", T), ("\\cos 60°", "\\frac12", T),
        ("\\sin 30^\\circ", "\\sin 30", F), ("\\tan 45^\\circ", "1", T), ("\\cos(180^\\circ)", "-1", T),
        ("\\sin 30^\\circ", "-\\frac{1}{2}", F), ("2\\sin 30^\\circ", "1", T), ("\\cos 60^\\circ", "\\cos 60", F),
        ("30^\\circ", "30", T), ("30^\\circ", "\\frac{\\pi}{6}", F), ("30^\\circ", "60", F),
        ("\\sin^2 45^\\circ", "\\frac12", T), ("\\sin(90^\\circ)", "\\sin 90", F), ("\\sin 30^\\circ", "\\sin\\frac{\\pi}{6}", T), ("\\cos(x^\\circ)", "\\cos x", F), ("\\cos(x^\\circ)", "\\cos\\frac{\\pi x}{180}", T),
    ],
    "equations_and_assignments": [
        ("3=x", "3", T), ("3=x", "x=3", T), ("x=3", "3=x", T), ("3=x", "4", F), ("3=x", "x=4", F),
        ("y=4, x=3", "(3,4)", T), ("x=3, y=4", "(3,4)", T), ("y=3, x=4", "(3,4)", F), ("x=4, y=3", "(3,4)", F),
        ("y=4, x=3", "x=3, y=4", T), ("y=4, x=3", "x=4, y=3", F), ("(x,y)=(3,4)", "(3,4)", T),
        ("(y,x)=(4,3)", "(3,4)", T), ("(y,x)=(3,4)", "(3,4)", F), ("a=1, b=2, c=3", "(1,2,3)", T),
        ("c=1, b=2, a=3", "(1,2,3)", F), ("y=2x+1", "2x+1=y", T), ("y=2x+1", "2x-1=y", F),
        ("x=3, x=3", "(3,3)", F), ("4=y", "y=4", T), ("y = 3", "x = 3", F), ("y=3, x=4", "3, 4", F), ("x+1=4", "x=3", F), ("2x=6", "x=3", F),
        ("2y=4x+2", "y=2x+1", T),
        ("y=4, x=3", "3, 4", T), ("x=1, x=2", "2, 1", T), ("y=3, x=4", "\\begin{pmatrix}3\\\\4\\end{pmatrix}", F),
        ("y=4, x=3", "\\begin{pmatrix}3\\\\4\\end{pmatrix}", T),
    ],
    "inequalities_and_sets": [
        ("x\\neq 0", "(-\\infty,0)\\cup(0,\\infty)", T), ("x\\ne 0", "(-\\infty,0)\\cup(0,\\infty)", T),
        ("x\\neq 0", "(0,\\infty)", F), ("x\\neq 1", "(-\\infty,0)\\cup(0,\\infty)", F),
        ("x\\neq 0", "x\\neq 0", T), ("x\\neq 0", "x \\neq 1", F), ("x\\neq 0", "\\mathbb{R}", F),
        ("|x|<2", "(-2,2)", T), ("|x|<2", "-2<x<2", T), ("|x|<2", "[-2,2]", F), ("|x|\\le 2", "[-2,2]", T),
        ("|x|<2", "x<2", F), ("|x|>1", "(-\\infty,-1)\\cup(1,\\infty)", T), ("|x|>1", "(1,\\infty)", F),
        ("|x-1|<2", "(-1,3)", T), ("|x-1|<2", "(-3,1)", F),
        ("\\{\\}", "\\emptyset", T), ("\\{\\}", "\\varnothing", T), ("\\{\\emptyset\\}", "\\emptyset", F),
        ("\\{0\\}", "\\emptyset", F), ("\\emptyset", "\\{0\\}", F), ("\\{\\}", "0", F),
        ("\\{1,2\\}", "[1,2]", F), ("[1,2]", "\\{1,2\\}", F), ("\\{1,2\\}", "\\{2,1\\}", T),
        ("[3,1]", "\\emptyset", F), ("[3,1]", "[5,4]", F), ("1, 2", "[1,2]", F),
        ("(-\\infty,0)\\cup(0,\\infty)", "x\\neq0", T), ("x>2", "(2,\\infty)", T), ("x \\geq 2", "(2,\\infty)", F),
        ("\\mathbb{R}\\setminus\\{0\\}", "x\\neq 0", T), ("\\mathbb{R}\\setminus\\{1\\}", "x\\neq 0", F),
        ("x^2<4", "(-2,2)", F), ("\\{1,2\\}", "(1,2)", F), ("\\{1,2\\}", "1, 2", T), ("|2x|<4", "(-2,2)", T), ("|x|<-1", "\\emptyset", T), ("[0,1]\\cup[1,2]", "[0,2]", T), ("(0,1)\\cup(1,2)", "(0,2)", F),  # restating the problem is not an answer
    ],
    "text_macros": [
        ("\\textcolor{red}{5}", "5", T), ("\\textcolor{red}{5}", "6", F), ("\\color{blue}{12}", "12", T),
        ("\\colorbox{yellow}{12}", "12", T), ("\\colorbox{yellow}{12}", "2", F), ("\\phantom{1}2", "2", T),
        ("\\phantom{1}2", "12", F), ("\\hspace{1cm}7", "7", T), ("\\hspace{1cm}7", "17", F),
        ("\\underline{4}", "4", T), ("\\boldsymbol{\\frac12}", "0.5", T), ("\\mathsf{9}", "9", T),
        ("\\textcolor{red}{-3}", "3", F), ("\\operatorname{5}", "5", T), ("\\text{\\textcolor{red}{8}}", "8", T),
        ("\\textbf{-1}", "1", F), ("\\emph{10}", "10", T), ("{\\color{red} 5}", "5", T), ("{\\color{red} 5}", "55", F), ("\\mathrm{e}^{2}", "e^2", T),
    ],
    "juxtaposition": [
        ("xy^2", "x^2y^2", F), ("yx^2", "x^2y", T), ("2xy^2", "2x^2y^2", F), ("ab^2", "(ab)^2", F),
        ("ab^2", "b^2a", T), ("2\\pi r^2", "2\\pi r r", T), ("{1}2", "2", F), ("\\textcolor{red}{1}2", "2", F),
        ("{1}{2}", "2", F), ("ab_1", "a b_1", T), ("ab_1", "(ab)_1", F),
    ],
    "units": [
        ("5\\text{ cm}", "5", T), ("5\\text{ cm}", "6", F), ("5\\text{ cm}", "5\\text{ m}", F),
        ("5\\text{ million}", "5", F), ("5\\text{ million}", "5000000", T), ("3\\text{ thousand}", "3", F),
        ("3 thousand", "3000", T), ("2\\text{ dozen}", "24", T), ("2\\text{ dozen}", "2", F),
        ("50\\text{ mm}", "5\\text{ cm}", F), ("12\\text{ inches}", "12\\text{ in}", T), ("7\\text{ m}^2", "7", T),
        ("7 \\text{ cm}^2", "7\\text{ cm}", F), ("\\$5", "5 \\text{ dollars}", T), ("4\\text{ hours}", "4", T),
        ("4 \\text{ hundred}", "4", F), ("4 \\text{ hundred}", "400", T), ("20\\%", "20", T), ("20\\%", "0.2", F), ("5\\text{ m}", "5\\text{ meters}", T), ("5\\text{ feet}", "5\\text{ ft}", T), ("5\\text{ m}", "500\\text{ cm}", F), ("1.5\\text{ million}", "1500000", T), ("1.5\\text{ million}", "1.5", F), ("12\\text{ square feet}", "12\\text{ ft}^2", T), ("12\\text{ square feet}", "12\\text{ ft}", F),
    ],
}


def all_cases() -> list[tuple[str, str, str, bool]]:
    """(class, answer, gold, expected) for every case."""
    return [(name, a, g, e) for name, cases in TRICKY.items() for a, g, e in cases]


def response(answer: str) -> str:
    """The model response that carries `answer`: boxed, unless the case is about the boxes themselves."""
    return f"So {answer}." if "\\boxed" in answer else f"The answer is $\\boxed{{{answer}}}$."
